"""Training of the decoding heads: PPD prompt tokens by self-distillation on ShareGPT.

`python -m train ppd` (see train/ppd.py); data in train/sharegpt.py and train/distill.py.
"""
