"""Evaluation: identification, decoding accuracy, voxel reliability, image similarity, human judgment.

The package is callable: ``brainrecon.evaluate(images, stimuli)`` is :func:`.scores.evaluate`
(pixel identification, pixel correlation and SSIM of reconstructions against their stimuli).
"""
import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, images, stimuli):
        """Score reconstructions against their stimuli: :func:`brainrecon.evaluate.scores.evaluate`."""
        from .scores import evaluate
        return evaluate(images, stimuli)


sys.modules[__name__].__class__ = _CallablePackage
