"""The `lmms_eval.models` entry point (setup.cfg): registers `--model kangaroo_jax` with lmms-eval.

Only lmms-eval loads this module. The class paths are imported lazily by lmms-eval's registry, when the
model is requested.
"""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(
    model_id="kangaroo_jax",
    chat_class_path="kangaroo_jax.lmms_eval_plugin.model.KangarooJax",
    simple_class_path="kangaroo_jax.lmms_eval_plugin.model.KangarooJaxSimple",
)
