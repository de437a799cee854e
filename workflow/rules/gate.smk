# A reproducer per non-pass cell, and (with config key `baseline`) the CI gate. Logic in
# pipeline_lib.results.reproducer and pipeline_lib.results.baseline.
import json
import shlex

BASELINE = config.get("baseline")
# The command that made the results, for the report.
SNAKEMAKE_COMMAND = shlex.join(sys.argv)
GATE_TARGETS = (
    (["results/reproducers"] + (["results/gate.ok"] if BASELINE else []))
    if config["models"]
    else []
)


# After the report, which never waits for it: a cell whose script cannot be written gets
# error.txt in its folder and the others go on (the rule fails only on an unreadable matrix).
rule reproducers:
    input:
        matrix="results/matrix.parquet",
        report="results/report.html",
    output:
        directory("results/reproducers"),
    log:
        "results/logs/reproducers.log",
    localrule: True
    conda:
        "../envs/pipeline.yaml"
    params:
        python=PYTHON,
        config=json.dumps(config),
    shell:
        "{params.python} -m pipeline_lib reproducers --matrix {input.matrix}"
        " --config-json {params.config:q} --out {output} > {log} 2>&1"


# Fails (exit 1, one line per cell) on a regression or an unexplained change; the report is
# written first, so it is there to read.
rule gate:
    input:
        matrix="results/matrix.parquet",
        report="results/report.html",
        baseline=BASELINE or [],
    output:
        comparison="results/comparison.parquet",
        ok="results/gate.ok",
    log:
        "results/logs/gate.log",
    localrule: True
    conda:
        "../envs/pipeline.yaml"
    params:
        python=PYTHON,
    shell:
        "{params.python} -m pipeline_lib gate --matrix {input.matrix} --baseline {input.baseline:q}"
        " --comparison {output.comparison} --ok {output.ok} 2>&1 | tee {log}"
