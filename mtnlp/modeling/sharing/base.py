"""The sharing-strategy base: the `SHARING` registry, each strategy's typed config class (as
peft registers a config class with each tuner), hard sharing, and building a strategy from the
plain dict a model config stores."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from mtnlp.utils.errors import UserError
from mtnlp.utils.registry import Registry

SHARING: Registry[type[SharingStrategy]] = Registry("sharing strategy")


# ------------------------------------------------------------------------------ options
def shape_option(default: Any) -> Any:
    """A field of an option class that shapes the strategy's parameters: a trained model's task
    columns fit only a strategy with the same value (`SharingStrategy.inherit`)."""
    return dataclasses.field(default=default, metadata={"shape": True})


@dataclass(frozen=True)
class SharingConfig:
    """The options of a sharing strategy, one field each, with their defaults. A strategy's
    options are the fields of its `config_class`, in field order (the order config.json keeps)."""

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def shape_options(cls) -> tuple[str, ...]:
        """The options that shape the strategy's parameters."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("shape"))

    def to_dict(self) -> dict[str, Any]:
        """The options as the model config stores them (after `name`), in field order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class HardSharingConfig(SharingConfig):
    """Hard sharing has no options."""


class SharingMismatch(UserError):
    """A trained column model's sharing does not fit the sharing asked for (another strategy, or
    other shape options): its task columns would be lost. `trained` and `requested` are the two
    sharing configs in full, as `{"name": ..., options}` (`{"name": "hard"}` for hard sharing);
    the training layer rewords the message in its flags."""

    def __init__(self, trained: dict[str, Any], requested: dict[str, Any]) -> None:
        self.trained, self.requested = trained, requested
        super().__init__(
            f"sharing: the trained model has {describe_sharing(trained)}, this model asks for "
            f"{describe_sharing(requested)}; its task columns fit only the same strategy and "
            "shape options"
        )


def describe_sharing(config: dict[str, Any]) -> str:
    """A sharing config's strategy and shape options in words: `soft sharing (layers=2)`,
    `hard sharing`."""
    shape = SHARING.get(config["name"]).config_class.shape_options()
    options = ", ".join(f"{option}={config[option]}" for option in shape)
    return f"{config['name']} sharing" + (f" ({options})" if options else "")


# ------------------------------------------------------------------------------ strategies
class SharingStrategy(nn.Module):
    """Base class. `options` are the strategy's entries of the config dict (its `config_class`
    fills in the rest); `tasks` are the model's task names in config order."""

    name: ClassVar[str]
    columns: ClassVar[bool] = False  # per-task top layers: the model's encode() delegates here
    config_class: ClassVar[type[SharingConfig]] = HardSharingConfig
    config: SharingConfig  # the options, an instance of `config_class`

    def __init__(self, encoder: nn.Module, tasks: list[str], options: dict[str, Any]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.config = self.config_class(**options)

    @property
    def options(self) -> dict[str, Any]:
        """Every option, as the model config stores them (after `name`)."""
        return self.config.to_dict()

    def full_config(self) -> dict[str, Any]:
        """`{"name": ..., options}`, every option filled in (`{"name": "hard"}` for hard)."""
        return {"name": self.name, **self.options}

    def load_from_encoder(self, encoder: nn.Module) -> None:
        """Start any per-task parameters from the (pretrained) encoder's weights."""

    def inherit(self, trained: SharingStrategy) -> None:
        """Start from the strategy of a trained multi-task model (as in MT-DNN's fine-tuning
        stage) for the tasks both know; the others keep their start. A trained model's task
        columns fit only the same strategy and shape options: anything else would drop them
        silently, so it raises `SharingMismatch`."""
        shape = self.config_class.shape_options()
        if trained.columns and (
            trained.name != self.name
            or any(getattr(trained.config, o) != getattr(self.config, o) for o in shape)
        ):
            raise SharingMismatch(trained.full_config(), self.full_config())

    def regularization_loss(self) -> Tensor | float:
        """The strategy's weighted penalty to add to the training loss (0 when it has none)."""
        return 0.0

    def mixing_parameters(self) -> list[nn.Parameter]:
        """Learned mixing units that train at `lr_scale` x the learning rate."""
        return []


@SHARING.register("hard")
class HardSharing(SharingStrategy):
    """One encoder shared by every task, one head each (Caruana 1997; MT-DNN): the model's own
    `encode()` runs the encoder once per batch."""

    name = "hard"


# ------------------------------------------------------------------------------ building
def resolve_sharing(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """A sharing config with every option of its strategy filled in (defaults where absent), as
    the model config stores it, so a saved model never depends on later defaults; None: hard."""
    config = dict(config or {"name": "hard"})
    strategy = SHARING.get(config.pop("name", "hard"))
    names = strategy.config_class.option_names()
    unknown = sorted(set(config) - set(names))
    if unknown:
        known = ", ".join(names) or "none"
        raise UserError(f"sharing: {unknown[0]}: not an option of {strategy.name} ({known})")
    if strategy is HardSharing:
        return None
    return {"name": strategy.name, **strategy.config_class(**config).to_dict()}


def build_sharing(
    config: dict[str, Any] | None, encoder: nn.Module, tasks: list[str]
) -> SharingStrategy:
    """The strategy a model config names (`None`: hard sharing), for `encoder` and `tasks`."""
    config = resolve_sharing(config) or {"name": "hard"}
    options = {key: value for key, value in config.items() if key != "name"}
    return SHARING.get(config["name"])(encoder, tasks, options)
