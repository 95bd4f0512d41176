"""Submission stage: turn the ensemble's test predictions into an NTIRE FR-track zip and check it.

Reads only what the ensemble stage wrote (`<runs_dir>/ensemble/ensemble.json`, `preds_test.csv`)
and the experiment config's `submission:` section. `python -m submission -c CONFIG` writes the zip;
`python -m submission.check ZIP --names FILE` validates any zip, ours or someone else's.
"""
