"""SFT pipeline library: chat rendering, packing, the model, training, evaluation, publishing."""
