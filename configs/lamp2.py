"""LaMP-2 with PPlug.

  python -m plug_jax.train --config configs/lamp2.py --workdir /tmp/pplug_lamp2
  python -m plug_jax.train --config configs/lamp2.py:paper --config.data.dir=LAMP_2 --workdir gs://...
"""

from configs import common


def get_config(arg=None):
    return common.lamp_config("LaMP_2", arg)
