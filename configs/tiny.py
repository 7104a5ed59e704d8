"""A seconds-scale variant of the synthetic config for tests and smoke runs (16³ patches)."""
from configs import synthetic


def get_config():
    c = synthetic.get_config()
    c.data.patch = (16, 16, 16)
    c.data.num_workers = 0  # a worker process costs more start-up than a few tiny steps save
    c.model.widths = (4, 8, 16)
    c.model.encoder_blocks = (1, 1, 1)
    c.model.decoder_blocks = (1, 1)
    c.optim.warmup_steps = 2
    c.train.steps = 8
    c.train.log_every = 2
    c.train.eval_every = 8
    c.checkpoint.every_steps = 4
    c.checkpoint.async_save = False
    c.eval.window = (16, 16, 16)
    c.eval.batch_size = 4
    return c
