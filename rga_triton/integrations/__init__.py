"""Adapters for the toolboxes re-ID people train and deploy with; none is a dependency of rga_triton.

One module per toolbox, each importing its toolbox only when used:

- :mod:`rga_triton.integrations.torchreid`: ``register()`` adds RGA-Net to torchreid's
  ``build_model`` factory;
- :mod:`rga_triton.integrations.fastreid`: importing it registers the fast-reid backbone
  ``build_rga_resnet_backbone`` and its ``MODEL.BACKBONE.RGA`` config node;
- :mod:`rga_triton.integrations.timm`: importing it registers the timm model ``rga_resnet50``;
- :mod:`rga_triton.integrations.onnx`: how ONNX export works from every backend (``exporting_to_onnx()``,
  which the dispatch asks, lives in ``common/tracing.py``), so that
  ``torch.onnx.export`` traces the torch path of every block.

This package imports none of them.
"""
