"""Hub sharing for the Perceiver models: a complete `auto_map` for remote-code loading and a model card on push.

transformers' `register_for_auto_class` puts only the saved class's own Auto class into `auto_map` (and AutoConfig
only when the config class is registered too). A folder saved here carries AutoConfig, AutoModel (the encoder) and
the head's task Auto class, so `AutoConfig`/`AutoModel`/`AutoModelFor…` all resolve with `trust_remote_code=True`
where `hf_flash_perceiver` is not installed.
"""

from __future__ import annotations

import os
import tempfile

from huggingface_hub import HfApi


def _module_name(cls: type) -> str:
    # The flat file name as it will sit in the saved folder ("modeling_perceiver"), also when the class itself was
    # loaded from remote code (module "transformers_modules.<hash>.modeling_perceiver").
    return cls.__module__.rsplit(".", 1)[-1]


class PerceiverHubMixin:
    """Mixed into `PerceiverPreTrainedModel`: complete `auto_map` on save, a model card on `push_to_hub`.

    Class attributes set per head:

    - `_hub_auto_class`: the head's task Auto class (`"AutoModelForImageClassification"`, ...). Perceiver IO models
      have none in transformers, so theirs is `"AutoModel"`, and their `auto_map` names the IO class for AutoModel.
    - `_hub_pipeline_tag`: the Hub pipeline tag of the model card, if any.
    - `_hub_card_fields`: the config fields the model card lists besides the encoder's.
    """

    _hub_auto_class: str = "AutoModel"
    _hub_pipeline_tag: str | None = None
    _hub_card_fields: tuple[str, ...] = ()
    _hub_base_class: str = "PerceiverModel"

    @classmethod
    def register_for_auto_class(cls, auto_class=None):
        """Save this class's code with its checkpoints, for `trust_remote_code=True` loading.

        Args:
            auto_class (`str` or type, *optional*): the Auto class to register under; defaults to the head's own
                task Auto class (`AutoModelForImageClassification` for the image classifier, and so on).
        """
        return super().register_for_auto_class(cls._hub_auto_class if auto_class is None else auto_class)

    def hub_auto_map(self) -> dict[str, str]:
        """The `auto_map` written with a registered model: AutoConfig, AutoModel (the encoder, or the IO model for
        IO heads) and the head's task Auto class (plus the class it was registered under, if another)."""
        module, config_cls = _module_name(type(self)), type(self.config)
        name = f"{module}.{type(self).__name__}"
        auto_map = {
            "AutoConfig": f"{_module_name(config_cls)}.{config_cls.__name__}",
            "AutoModel": f"{module}.{self._hub_base_class}",
            self._hub_auto_class: name,
        }
        if self._auto_class is not None:
            auto_map[self._auto_class] = name
        return auto_map

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """As `PreTrainedModel.save_pretrained`; a model registered with `register_for_auto_class` also gets a
        complete `auto_map` (see [`hub_auto_map`]) next to its code."""
        if self._auto_class is not None:
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **self.hub_auto_map()}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def model_card(self, repo_id: str | None = None, tags: list[str] | None = None) -> str:
        """A model card (README.md text): Hub metadata, the config summary and how to load and run the model."""
        config = self.config
        repo_id = repo_id or "path/to/model"
        all_tags = ["flash-perceiver", "perceiver", *(tags or [])]
        front = ["---", "library_name: transformers", "tags:", *[f"- {t}" for t in dict.fromkeys(all_tags)]]
        if self._hub_pipeline_tag:
            front.append(f"pipeline_tag: {self._hub_pipeline_tag}")
        front.append("---")

        rows = {
            "model class": f"`{type(self).__name__}`",
            "parameters": f"{sum(p.numel() for p in self.parameters()):,}",
            "depth (cross-attention blocks)": config.depth,
            "self-attentions per block": config.self_per_cross_attn,
            "latents": f"{config.num_latents} x {config.latent_dim}",
            "cross-attention (heads x head width)": f"{config.cross_heads} x {config.cross_head_dim}",
            "latent self-attention (heads x head width)": f"{config.latent_heads} x {config.latent_head_dim}",
            "input width": config.input_dim,
        }
        for field in self._hub_card_fields:
            rows[field] = getattr(config, field)
        if "num_labels" in self._hub_card_fields and config.id2label:
            labels = [str(config.id2label[i]) for i in sorted(config.id2label)]
            rows["labels"] = ", ".join(labels[:20]) + (", ..." if len(labels) > 20 else "")
        table = ["| field | value |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows.items()]]

        usage = ["```python", *self._card_usage(repo_id), "```"]
        body = [
            f"# {repo_id}",
            "",
            f"A `{type(self).__name__}` from `hf-flash-perceiver`: Perceiver / Perceiver IO on fused attention "
            "(PyTorch SDPA: FlashAttention-2 / cuDNN) as a transformers plugin.",
            "",
            "## Configuration",
            "",
            *table,
            "",
            "## Usage",
            "",
            *usage,
            "",
        ]
        return "\n".join(front + [""] + body)

    def _card_usage(self, repo_id: str) -> list[str]:
        """The card's loading snippet, true to how the model is saved: a model registered with
        `register_for_auto_class` saves its code and an `auto_map` (loads with `trust_remote_code=True`, package or
        not); any other needs the package imported, which registers the "flash_perceiver" model type."""
        auto, name = self._hub_auto_class, type(self).__name__
        # IO models have no task Auto class: with the package imported, AutoModel gives the encoder, so load by class.
        by_class = auto == "AutoModel" and name != "PerceiverModel"
        with_package = (
            [f"from hf_flash_perceiver import {name}", "", f'model = {name}.from_pretrained("{repo_id}")']
            if by_class
            else ["import hf_flash_perceiver  # registers the flash_perceiver model type with the Auto classes",
                  f"from transformers import {auto}", "", f'model = {auto}.from_pretrained("{repo_id}")']
        )
        pipe = self._hub_pipeline_tag
        if self._auto_class is not None:
            lines = [
                "# The modeling code ships with the checkpoint: no other package than transformers is needed.",
                f"from transformers import {auto}",
                "",
                f'model = {auto}.from_pretrained("{repo_id}", trust_remote_code=True)',
            ]
            if pipe:
                lines += ["", "from transformers import pipeline", "",
                          f'pipe = pipeline("{pipe}", model="{repo_id}", trust_remote_code=True)']
            return lines + ["", "# Or, with `pip install hf-flash-perceiver` (its classes take precedence):",
                            *with_package]
        lines = [
            "# Needs `pip install hf-flash-perceiver`, and `import hf_flash_perceiver` before loading: without the",
            "# import transformers does not know the model type `flash_perceiver` (its error then suggests upgrading",
            "# transformers, which does not help). This checkpoint carries no modeling code: trust_remote_code cannot",
            "# replace the package.",
            *with_package,
        ]
        if pipe:
            lines += ["", "from transformers import pipeline", "", f'pipe = pipeline("{pipe}", model="{repo_id}")']
        return lines

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
        model_card: bool = True,
    ):
        """Upload the model (weights, config, and its code when registered for an Auto class) to the Hub.

        As `PreTrainedModel.push_to_hub`, except for the card: this one writes [`model_card`] (config summary and
        usage) as README.md, instead of transformers' generic template. `model_card=False` uploads no README, so a
        card already on the Hub stays as it is.
        """
        api = HfApi(token=token) if isinstance(token, str) else HfApi()
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp_dir:
            self.save_pretrained(tmp_dir, max_shard_size=max_shard_size)
            if model_card:
                with open(os.path.join(tmp_dir, "README.md"), "w", encoding="utf-8") as f:
                    f.write(self.model_card(repo_id, tags))
            return self._upload_modified_files(
                tmp_dir,
                repo_id,
                files_timestamps={},
                commit_message=commit_message,
                token=token,
                create_pr=create_pr,
                revision=revision,
                commit_description=commit_description,
            )


__all__ = ["PerceiverHubMixin"]
