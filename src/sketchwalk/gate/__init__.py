"""SeerAttention's learned gate: `model` (AttnGate and its selection rule), `checkpoint`
(SeerAttention's folder format), `train` (self-distillation, `sketchwalk train-gate`).
"""
