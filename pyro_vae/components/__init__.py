"""Components: priors p(z), likelihoods p(x | z) and networks, plain Pyro and PyTorch."""
