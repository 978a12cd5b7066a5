"""Reconstruction from DNN features: ``icnn.reconstruct`` with the priors in ``pixels``, ``lbfgs``, ``latent``,
``fourier`` and ``dip``; the loss in ``objective``, image transforms in ``transforms``, settings in ``config``."""
