"""Diagnostics of trained models: the paper's kernel analyses (:mod:`.kernels`, :mod:`.kernel_plots`,
``refconv-analyze``) and the loss landscape (:mod:`.landscape`, :mod:`.landscape_run`, :mod:`.landscape_plots`,
``refconv-analyze landscape``)."""
