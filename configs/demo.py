"""`make demo`: a small model learns synthetic video QA (train/demo_data.py) on a CPU in about 10 minutes.

arg: data=<ArrayRecord folder>,tokenizer=<folder>,steps=N,frame_size=PX,batch=B,lr=LR,tpe=none|sinusoidal|learned,
     seed=S (model init and batch order), seq_len=L, patchify=avg|conv3d, spatial_patch=S, tap=..., vision_lr=X
     (LR scale of the ViT and projector), warmup=FRACTION, vit_width=W, vit_mlp=M (the probe's knobs:
     benchmarks/demo_probe.py)
"""

from configs.common import PROJECTOR, VISION, base, parse_arg
from train.demo_data import FRAME_SIZE, FRAMES


def get_config(arg=None):
  a = parse_arg(
      arg,
      data="",
      tokenizer="",
      steps=1500,
      frame_size=FRAME_SIZE,
      batch=8,
      lr=7e-4,
      tpe="none",
      seed=0,
      seq_len=240,
      patchify="conv3d",
      spatial_patch=1,
      tap="last_prenorm",
      vision_lr=1.0,
      warmup=0.1,
      vit_width=96,
      vit_mlp=256,
  )
  c = base("demo")
  c.model.preset = "tiny"
  # Wider than `tiny`, at 84 px and without the 2x2 spatial merge (spatial_patch=1): a 6x6 patch grid gives
  # 36 visual tokens per frame pair, 144 per clip (seq_len 240 holds them and the ~90 text tokens). The merge
  # averages away where a shape's corners are (benchmarks/demo_vit_pooling.py --merge) and made direction a knife
  # edge (38.6% to 84.3% by seed at 112 px, 1,800 steps: benchmarks/demo_probe.py); at 84 px a step costs what the
  # merged 112 px step did, because the ViT, not the LLM, is most of it.
  grid = a.frame_size // 14
  c.model.overrides = dict(
      vision=dict(
          image_size=a.frame_size,
          width=a.vit_width,
          num_layers=2,
          head_width=32,
          mlp_hidden=a.vit_mlp,
          pt_hw_seq_len=grid,
          feature_tap=a.tap,
      ),
      llm=dict(hidden_size=128, intermediate_size=320, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32),
      # No TPE: at 2 s per clip the fixed sinusoidal TPE is a unit-amplitude vector (norm ~7 at width
      # 96) nearly equal for every frame, large next to a from-scratch ViT's features. `make demo` with
      # it reached 38.5% held-out direction accuracy, without it 94.0% (same data, seed and 1,500 steps).
      # Frame order then comes from the LLM's token positions, and within a frame pair from the conv3d
      # patchify: its depthwise kernel weighs the pair's two frames (and the 2x2 patches) separately, so a
      # token can hold where the shape went inside the pair, which the parameter-free mean erases. In the
      # probe (benchmarks/demo_probe.py, seed 1, 1,000 steps) held-out direction was 99.4% with it, 40.0%
      # with "avg".
      projector=dict(tpe=a.tpe, patchify=a.patchify, spatial_patch=a.spatial_patch),
  )
  c.seed = a.seed  # model init; the batch order below
  c.total_steps = a.steps
  c.log_every = 25
  c.data.update(
      source="grain",
      dataset=a.data,
      tokenizer=a.tokenizer,
      batch_size=a.batch,
      seq_len=a.seq_len,
      frame_size=a.frame_size,
      max_frames=FRAMES,
      num_frames=FRAMES,
      worker_count=0,
      shuffle_seed=a.seed,
  )
  # lr 7e-4: at 2e-3 seed 2 stayed on the plateau where colour and order are learnt and direction and shape are
  # at chance (72.9% / 36.4% held out at 1,500 steps, 40.0% / 45.0% at 1,800); at 1e-3 it reached 80.0% / 87.9%
  # and at 7e-4 100% / 97.1% (`python -m train.demo --seed 2`, one run each: README). Likely why: with batch 8
  # and one supervised decision per clip the gradient is noisy, and a smaller step averages more clips into each
  # change of the ViT features that direction and shape need.
  c.optim.update(
      lr=a.lr, warmup_steps=max(1, int(a.steps * a.warmup)), min_lr_ratio=0.05, weight_decay=0.0, clip_norm=1.0
  )
  if a.vision_lr != 1.0:
    c.optim.lr_scales = ((VISION, a.vision_lr), (PROJECTOR, a.vision_lr))
  c.ckpt.update(every=max(1, a.steps), keep=1, keep_best=0)
  c.mesh.fsdp = -1
  return c
