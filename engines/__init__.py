"""The torch-free runtime of pqcad-deploy: our ONNX -> engine directory -> images.

Only numpy, onnx, tqdm and pillow are imported eagerly; onnxruntime, tensorrt and the CUDA bindings
are imported when used (``engines._lazy``). Nothing here imports torch, ``pqcad_deploy`` or
``converters`` (tested in tests/engines/test_engines_import_boundary.py). Import the submodules
directly, e.g. ``from engines.manifest import read_onnx_manifest``.
"""

__all__: list[str] = []
