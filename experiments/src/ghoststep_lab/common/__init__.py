"""Helpers shared by the experiments (no experiment lives here).

=================  ==================================================================
``runner``         the runner contract, presets, ``parallel_map``, progress bars
``results``        ``Results`` / ``Claim`` / ``Table``, claims declared as data
``report``         the markdown report written next to ``results.json``
``training``       the one training loop (:func:`~.training.loop`) and its summaries
``data``           digits, the Markov language, CIFAR-10 loading and batching
``text``           the Python-stdlib corpus and BPE tokenizers of the LM experiments
``models``         MLP / CNN / transformer / ResNet-18 / TinyLM builders
``probes``         line probes along a direction (loss, ghosts, Hessian step)
``stabilizers``    adaptive clipping baselines (AGC, ZClip, AdaGC, SPAM, ...)
``figures``        matplotlib figure helpers
=================  ==================================================================
"""
