"""The imagery part of the report: within-family scores beside perception, and the information bound."""
from __future__ import annotations

import html

ROWS = (("pixel_identification", "perception_pixel_identification", "pixel identification within the family"),
        ("colour_identification", "perception_colour_identification", "colour identification (same form, other colours)"),
        ("shape_identification", "perception_shape_identification", "shape identification (same colour, other forms)"))


def _pct(v) -> str:
    return "" if v is None else f"{v:.1%}"


def imagery_html(entry: dict) -> str:
    """HTML tables of a metrics.json ``imagery`` entry (:class:`~brainrecon.evaluate.imagery.ImageryScores`)."""
    fams = entry.get("families", {})
    rows = []
    for f, s in fams.items():
        for key, pkey, what in ROWS:
            if key in s:
                rows.append(f"<tr><td>{html.escape(f)} ({s['n_targets']})</td><td>{what}</td>"
                            f"<td class='big'>{_pct(s[key])}</td><td>{_pct(s.get(pkey))}</td></tr>")
    out = ("<h3>Imagery against perception of the same targets</h3><table><tr><th>family (targets)</th><th>score</th>"
           "<th>imagery</th><th>perception</th></tr>" + "".join(rows) + "</table>"
           "<p class='sub'>Pairwise identification by pixel correlation within each family of targets (chance 50%): "
           "imagined shapes among the imagined shapes, natural images among the natural ones; colour and shape "
           "identification compare a shape's reconstruction only with the shapes that differ from its target in "
           "colour or in form. Perception: the reconstructions of the same targets from the perception test sets "
           "of this run (row 'perception' above), scored the same way.</p>")
    bound = entry.get("information_bound", {})
    if bound:
        names = [f for f in fams if any(f in v for v in bound.values())]
        head = "".join(f"<th>{html.escape(f)}</th>" for f in names)
        body = "".join(f"<tr><td>{html.escape(roi)}</td>" + "".join(f"<td>{_pct(v.get(f))}</td>" for f in names) + "</tr>"
                       for roi, v in bound.items())
        out += ("<h3>Information bound: imagery voxel patterns identified among perception patterns</h3>"
                f"<table><tr><th>ROI</th>{head}</tr>{body}</table><p class='sub'>Each trial-averaged imagery pattern "
                "against the perception patterns of its family's targets (voxels centred per condition; chance 50%): "
                "whether the brain data carry the imagined image at all, before the decoders and the reconstruction.</p>")
    return out
