"""Training on DeepSpeed (the only package that imports deepspeed): start-up, checkpoints, the loop, objectives,
hard negatives and the two stages."""
