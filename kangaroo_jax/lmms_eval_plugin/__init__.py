"""lmms-eval plugin: `lmms-eval --model kangaroo_jax --model_args pretrained=CKPT,num_frames=64 --tasks ...`.

  runner.py         the harness-independent part (batched generation, log-likelihoods); no lmms-eval import
  recipe_prompt.py  lays a task's multiple-choice prompt out in a benchmark recipe's template
  model.py          the lmms-eval model classes (imports lmms-eval)
  manifest.py       the `lmms_eval.models` entry point (a ModelManifest)
  __main__.py       `python -m kangaroo_jax.lmms_eval_plugin ARGS`: lmms-eval's CLI, then the plugin's
                    provenance added to the results JSON it wrote

lmms-eval 0.7.3 pins av<16, so it lives in its own environment (`make eval-env`, .venv-eval); importing
this package (or kangaroo_jax) loads nothing from lmms-eval.
"""
