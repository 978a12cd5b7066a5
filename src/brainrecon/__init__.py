"""brainrecon: deep image reconstruction from fMRI (Shen, Horikawa, Majima & Kamitani 2019), and beyond.

The public API (a walk-through: docs/api.md)::

    import brainrecon as br
    train = br.read_fmri("train.h5", roi="ROI_VC")
    test = br.read_fmri("test.h5", roi="ROI_VC")
    net = br.load_network("hed-vgg16")
    decoder = br.FeatureDecoder(net, image_size=64).fit(train, br.load_images("stimuli/", train.labels))
    decoded = decoder.predict(test)
    images = br.reconstruct(decoded, net, br.ReconConfig(prior="fourier", iterations=200))
    scores = br.evaluate(images, br.load_images("stimuli/", decoded.labels))

Names are imported on first use, so ``import brainrecon`` stays cheap. ``br.evaluate`` is the
evaluation subpackage, callable as :func:`brainrecon.evaluate.scores.evaluate`.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # data
    "read_fmri": "brainrecon.data.bdata", "FmriData": "brainrecon.data.bdata",
    "load_images": "brainrecon.data.stimuli", "Stimuli": "brainrecon.data.stimuli",
    "StimulusSet": "brainrecon.data.stimuli", "read_label_map": "brainrecon.data.labelmaps",
    "simulate_subject": "brainrecon.simulate.subject", "SubjectConfig": "brainrecon.simulate.subject",
    # networks
    "load_network": "brainrecon.nets", "load_generator": "brainrecon.nets",
    # decoding
    "FeatureDecoder": "brainrecon.decode.decoder", "DecoderConfig": "brainrecon.decode.decoder",
    "DecodedFeatures": "brainrecon.decode.decoder", "LayerPenalty": "brainrecon.decode.decoder",
    # reconstruction
    "ReconConfig": "brainrecon.recon.config", "Reconstruction": "brainrecon.recon.icnn",
    # evaluation
    "ImageScores": "brainrecon.evaluate.scores",
    "pairwise_identification": "brainrecon.evaluate.identification", "score_imagery": "brainrecon.evaluate.imagery",
    "evaluate_run": "brainrecon.evaluate.protocol", "Evaluation": "brainrecon.evaluate.protocol",
    # the whole pipeline
    "run_pipeline": "brainrecon.pipeline", "PipelineConfig": "brainrecon.pipeline", "RunFolder": "brainrecon.runfolder",
}
_RENAMED = {"reconstruct": ("brainrecon.recon.icnn", "reconstruct_decoded")}

__all__ = sorted([*_EXPORTS, *_RENAMED, "evaluate", "__version__"])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name == "evaluate":      # the subpackage (callable: see brainrecon/evaluate/__init__.py)
        return importlib.import_module("brainrecon.evaluate")
    if name in _RENAMED:
        module, attr = _RENAMED[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'brainrecon' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
