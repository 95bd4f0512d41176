"""Ensemble stage: combine member predictions (members/ outputs) into one honest, validated score.

Run `python -m ensemble -c configs/demo.yaml`; see `ensemble/__main__.py`.
"""
