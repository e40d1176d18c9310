"""biformer-lit: BiFormer and controlled attention ablations on PyTorch Lightning.

Light on purpose (the command line answers --help without torch): `import biformer_lit.models` registers
the models with timm, as does any module that builds them (biformer_lit.module, the commands).
"""
__version__ = "0.1.0"
