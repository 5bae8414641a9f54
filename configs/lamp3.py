"""LaMP-3 with PPlug.

  python -m plug_jax.train --config configs/lamp3.py --workdir /tmp/pplug_lamp3
  python -m plug_jax.train --config configs/lamp3.py:paper --config.data.dir=LAMP_3 --workdir gs://...
"""

from configs import common


def get_config(arg=None):
    return common.lamp_config("LaMP_3", arg)
