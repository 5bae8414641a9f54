"""LaMP-4 with PPlug.

  python -m plug_jax.train --config configs/lamp4.py --workdir /tmp/pplug_lamp4
  python -m plug_jax.train --config configs/lamp4.py:paper --config.data.dir=LAMP_4 --workdir gs://...
"""

from configs import common


def get_config(arg=None):
    return common.lamp_config("LaMP_4", arg)
