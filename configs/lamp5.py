"""LaMP-5 with PPlug.

  python -m plug_jax.train --config configs/lamp5.py --workdir /tmp/pplug_lamp5
  python -m plug_jax.train --config configs/lamp5.py:paper --config.data.dir=LAMP_5 --workdir gs://...
"""

from configs import common


def get_config(arg=None):
    return common.lamp_config("LaMP_5", arg)
