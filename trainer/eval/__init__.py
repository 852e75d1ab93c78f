"""Evaluation: ShapesEval (a CPU pixel analyzer for the synthetic shapes domain) and FID / CLIP
score wrappers that only read weights from local paths.

Import from the submodules (``trainer.eval.shapes_eval``, ``trainer.eval.fid_clip``) so that
ShapesEval does not pull in torch or torchmetrics.
"""
