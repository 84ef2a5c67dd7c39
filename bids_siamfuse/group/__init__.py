"""The group level: ``bids_siamfuse BIDS_DIR OUTPUT_DIR group --classes CN AD``.

:mod:`.plan` checks the request without reading any image (:func:`.plan.plan_group`: labels
from ``BIDS_DIR/participants.tsv``, region files found in ``OUTPUT_DIR``, enough subjects per
class for the folds; devices, threads and the training configuration arrive resolved by
:func:`bids_siamfuse.config.resolve`); :mod:`.run` reads exactly the planned files
(:mod:`.cohort`), cross-validates the model and the baselines
(:func:`bids_siamfuse.model.cv.cross_validate`), trains the final model on every selected
subject and writes ``OUTPUT_DIR/group/<A>_vs_<B>/`` (:mod:`.outputs`, ``docs/outputs.md``). The
folder is built under a hidden name and renamed into place at the end, so a crashed or
interrupted run never leaves a half-written report under the real name (a previous report stays
until the new one is complete).

Errors (one line, documented exit code): fewer than two ``--classes`` or a repeated one, or a
label that ``participants.tsv`` does not hold: 64; ``participants.tsv`` missing, without the
label column, or listing no subject of a class among the derivatives; a class with fewer
subjects than ``--folds``: 65; no region files in ``OUTPUT_DIR``: 66; filters that select no
region file of the classes: 18.
"""
