"""The ZenML side of promotion: :class:`kdpipe.champion.StageStore` over one ZenML model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zenml import log_metadata
from zenml.client import Client
from zenml.enums import ModelStages


class ZenmlStageStore:
    """The versions of ZenML model ``model_name`` (the Model Control Plane), by name."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name

    def production_version(self) -> str | None:
        try:
            return str(Client().get_model_version(self.model_name, ModelStages.PRODUCTION).name)
        except KeyError:  # no version in production yet
            return None

    def set_production(self, version: str) -> None:
        # force=True archives the version that was in production.
        Client().update_model_version(model_name_or_id=self.model_name,
                                      version_name_or_id=version,
                                      stage=ModelStages.PRODUCTION, force=True)

    def tag(self, version: str, tag: str) -> None:
        Client().update_model_version(model_name_or_id=self.model_name,
                                      version_name_or_id=version, add_tags=[tag])

    def log_metadata(self, version: str, metadata: Mapping[str, Any]) -> None:
        log_metadata(metadata=dict(metadata), model_name=self.model_name,
                     model_version=version)
