"""LaMP-7 with PPlug.

  python -m plug_jax.train --config configs/lamp7.py --workdir /tmp/pplug_lamp7
  python -m plug_jax.train --config configs/lamp7.py:paper --config.data.dir=LAMP_7 --workdir gs://...
"""

from configs import common


def get_config(arg=None):
    return common.lamp_config("LaMP_7", arg)
