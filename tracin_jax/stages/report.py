"""The `report` stage: `<workdir>/report/index.html`, written at the end of every run.

Reads the manifests of the stages that ran in the workdir (a stage that did not run is
absent from the report, not an error) and, where the influence stage ran, writes a page per
explained validation image (`tracin_jax.report`; on volumes, per validation volume).
"""

from __future__ import annotations

import dataclasses
import pathlib

from tracin_jax import outputs
from tracin_jax import report as report_lib
from tracin_jax.settings import setting
from tracin_jax.stages import base


@dataclasses.dataclass(frozen=True)
class ReportConfig:
  """Settings of the report."""

  pages: int = setting(6, "Validation images with a page in the report (the saliency "
                       "stage's first).", flag="report_pages", minimum=0)
  top: int = setting(5, "Proponents and opponents shown per region on an image's page.",
                     flag="report_top", minimum=1)


@dataclasses.dataclass
class ReportOutputs:
  """The report stage's result: the index's path and the manifest."""

  index: pathlib.Path
  manifest: base.Manifest


@base.register_stage
class ReportStage(base.StageBase):
  """An HTML report of the run, from the other stages' manifests."""

  name, config_cls, needs = "report", ReportConfig, ()
  supports_volumes = True

  def _others(self, context: base.Context) -> dict[str, tuple[str, str]]:
    found = {}
    for name in base.list_stages():
      record = base.read_manifest(context.workdir, name) if name != self.name else None
      if record is not None:
        found[name] = (record.get("fingerprint", ""), record.get("finished", ""))
    return found

  def fingerprint(self, context: base.Context) -> str:
    return base.inputs_key({"stages": self._others(context),
                            "settings": outputs.plain(self.config),
                            "data": context.data_fingerprint()})

  writes = (base.Output(report_lib.INDEX, "the run's report: settings, timings, Dice, checks, "
                        "saliency tables and every figure with its caption; open it in a "
                        "browser (no server needed)"),)

  def compute(self, context: base.Context) -> ReportOutputs:
    """Nothing to compute: the report is what the other stages wrote, rendered by `write`."""
    return ReportOutputs(context.workdir / self.name / report_lib.INDEX, self.manifest())

  def write(self, context: base.Context, result: ReportOutputs) -> base.Manifest:
    manifest = self.manifest()
    self.list_output(context, manifest, self.writes[0])
    influence = (context.need("influence")
                 if base.read_manifest(context.workdir, "influence") else None)
    index = report_lib.build_report(
        context.workdir, train_set=context.train_set, val_set=context.val_set,
        influence=influence, max_pages=self.config.pages, top=self.config.top)
    context.log(f"Wrote {index} ({len(list((index.parent / 'images').glob('*.html')))} "
                "image pages).")
    return manifest

  def load(self, context: base.Context) -> ReportOutputs:
    manifest = base.Manifest.from_record(base.read_manifest(context.workdir, self.name))
    return ReportOutputs(context.workdir / self.name / report_lib.INDEX, manifest)
