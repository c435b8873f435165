"""`make demo`: the tiny model learns synthetic video QA (train/demo_data.py) on a CPU in a few minutes.

arg: data=<ArrayRecord folder>,tokenizer=<folder>,steps=N
"""

from configs.common import base, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, data="", tokenizer="", steps=300)
  c = base("demo")
  c.model.preset = "tiny"
  c.total_steps = a.steps
  c.log_every = 25
  c.data.update(source="grain", dataset=a.data, tokenizer=a.tokenizer, batch_size=16, seq_len=256,
                frame_size=56, max_frames=16, num_frames=8, worker_count=0)
  c.optim.update(lr=3e-3, warmup_steps=20, min_lr_ratio=0.05, weight_decay=0.0, clip_norm=1.0)
  c.ckpt.update(every=100, keep=2, keep_best=1)
  c.mesh.fsdp = -1
  return c
