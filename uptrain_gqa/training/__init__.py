"""The training stage: uptraining a converted checkpoint with accelerate, from 1 CPU to many GPU nodes."""
