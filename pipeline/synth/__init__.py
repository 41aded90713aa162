"""Synthetic Yellow River Station 557.7 nm all-sky archive: raw frames, labelled sets, timelines.

The generator is a small physical instrument model, so that every later measurement made on its
output means something:

* **Sky** (:mod:`.morphology`, :mod:`.render`). Auroral emission is a 3-D field: a horizontal
  pattern (arcs, folded curtains, ray footprints, spots, patches; in km, defined in a plane at
  the 110 km reference altitude) times a vertical volume-emission profile (a Chapman layer,
  557.7 nm). It is integrated along each pixel's line of sight through 20 altitude layers
  (spherical Earth; field-aligned structures follow the tilted geomagnetic field, dip 82 deg at
  YRS). So curtains off zenith look wide with a sharp lower border, thin near zenith, and rays
  converge on the magnetic zenith, as they do.
* **Camera** (:mod:`.geometry`, :mod:`.render`). An equidistant fisheye (zenith angle
  proportional to radius, horizon at ~250 px of 512) around the station's optical centre,
  vignetting, airglow with the van Rhijn brightening, twilight from the real solar elevation,
  stars from a fixed catalogue that turn with sidereal time, station lights and glare in the
  outer ring only (the 440 crop removes them), photon (shot) noise, read noise, and a
  fixed-pattern dark frame per camera season (bias, column/row pattern, amplifier glow, hot
  pixels) that is written out as calib/dark_*.png.
* **Drift** (:mod:`.season`). :class:`Season` (one per winter, derived from the year) changes
  gain, sensitivity, read noise, vignetting, dark frame and hot pixels, so
  train-on-2003/test-on-later is a real test.
* **Classes.** Brightness distributions of the four classes overlap on purpose and ~15 % of
  frames carry a weaker second morphology (40 % of archive frames that sit at a class change of
  the timeline carry the neighbouring class), so only shape and texture separate the classes.
* **Plans** (:mod:`.timeline`): the times and classes of a labelled set or an archive, from the
  occurrence model or an expert timeline; **writing** (:mod:`.writer`): the plan rendered into
  an output folder, resumably; **inspection** (:mod:`.montage`).

Public API (importable from ``pipeline.synth``): :func:`render_frame`, :func:`frame_rng`,
:func:`make_labelled`, :func:`make_archive`, :func:`parse_winters`, :class:`Season`,
:func:`season_for`, :func:`winter_of`, :func:`dark_frame`, :func:`read_timeline`,
:func:`derive_occurrence_model`, :func:`write_occurrence_model`, :func:`load_occurrence_model`,
:func:`class_counts`, :func:`labelled_plan`, :func:`archive_plan`, :func:`frame_name`,
:func:`quicklook`, :func:`montage`.
"""

from pipeline.synth.geometry import FOV_RADIUS_512
from pipeline.synth.montage import montage, quicklook
from pipeline.synth.render import AMBIGUOUS_SHARE, TRANSITION_SHARE, frame_rng, render_frame
from pipeline.synth.season import Season, dark_frame, season_for
from pipeline.synth.timeline import (
    OCCURRENCE_MODEL,
    archive_plan,
    class_counts,
    derive_occurrence_model,
    frame_name,
    labelled_plan,
    load_occurrence_model,
    read_timeline,
    write_occurrence_model,
)
from pipeline.synth.writer import MAX_SIZE, MIN_SIZE, make_archive, make_labelled, parse_winters
from pipeline.winter import winter_of

__all__ = [
    "AMBIGUOUS_SHARE",
    "FOV_RADIUS_512",
    "MAX_SIZE",
    "MIN_SIZE",
    "OCCURRENCE_MODEL",
    "TRANSITION_SHARE",
    "Season",
    "archive_plan",
    "class_counts",
    "dark_frame",
    "derive_occurrence_model",
    "frame_name",
    "frame_rng",
    "labelled_plan",
    "load_occurrence_model",
    "make_archive",
    "make_labelled",
    "montage",
    "parse_winters",
    "quicklook",
    "read_timeline",
    "render_frame",
    "season_for",
    "winter_of",
    "write_occurrence_model",
]
