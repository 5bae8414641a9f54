"""LaMP-1 with PPlug.

  python -m plug_jax.train --config configs/lamp1.py --workdir /tmp/pplug_lamp1
  python -m plug_jax.train --config configs/lamp1.py:paper --config.data.dir=LAMP_1 --workdir gs://...
"""

from configs import common


def get_config(arg=None):
    return common.lamp_config("LaMP_1", arg)
