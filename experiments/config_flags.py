"""The flags derived from the configs, now `tracin_jax.cli.config_flags`; scripts and
notebooks that import them from here keep working."""

# pylint: disable=unused-import
from tracin_jax.cli.config_flags import ConfigFlags  # noqa: F401
from tracin_jax.cli.config_flags import define_app_flags  # noqa: F401
from tracin_jax.cli.config_flags import define_flags  # noqa: F401
from tracin_jax.cli.config_flags import from_flagfile  # noqa: F401
from tracin_jax.cli.config_flags import help_text  # noqa: F401
