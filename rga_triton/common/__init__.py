"""Leaves: settings, argument checks, BatchNorm semantics, tensor layouts, the algorithm cost model,
and the torch.compile marker. They import nothing of the package above them."""
