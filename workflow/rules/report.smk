# The matrix report. Its inputs are the two Parquet files only, so rebuilding the report never
# re-runs a torchrun job.
import json

from snakemake import __version__ as SNAKEMAKE_VERSION


rule render_report:
    input:
        matrix="results/matrix.parquet",
        tensors="results/tensors.parquet",
        baseline=config.get("baseline") or [],
    output:
        html=report("results/report.html", caption="../report/report_html.rst", category="Matrix"),
        markdown=report("results/summary.md", caption="../report/summary_md.rst", category="Matrix"),
    log:
        "results/logs/report.log",
    localrule: True
    conda:
        "../envs/pipeline.yaml"
    params:
        python=PYTHON,
        config=json.dumps(config),
        snakemake_version=SNAKEMAKE_VERSION,
        command=SNAKEMAKE_COMMAND,
    shell:
        "{params.python:q} -m pipeline_lib report --matrix {input.matrix} --tensors {input.tensors}"
        " --config-json {params.config:q} --snakemake-version {params.snakemake_version}"
        " --command {params.command:q}"
        " --html {output.html} --markdown {output.markdown} > {log} 2>&1"
