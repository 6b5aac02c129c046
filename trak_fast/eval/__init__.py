"""Evaluation: the linear datamodeling score (:mod:`.lds`), the embedded digits data
(:mod:`.digits`) and the demo (:mod:`.demo`, ``make demo``)."""
