rule save_checkpoint:
    output:
        record="results/save/{model}/{layout}.json",
        save_dir=directory("results/save/{model}/{layout}"),
    log:
        "results/logs/save/{model}/{layout}.log",
    conda:
        "../envs/pipeline.yaml"
    threads: plan.threads
    resources:
        ranks=plan.ranks,
    params:
        python=PYTHON,
        spec=plan.save_spec,
    shell:
        "{params.python} -m pipeline_lib save --spec {params.spec:q} > {log} 2>&1"


rule load_checkpoints:
    input:
        plan.load_inputs,
    output:
        record="results/load/{model}/{layout}.json",
    log:
        "results/logs/load/{model}/{layout}.log",
    conda:
        "../envs/pipeline.yaml"
    threads: plan.threads
    resources:
        ranks=plan.ranks,
    params:
        python=PYTHON,
        spec=plan.load_spec,
    shell:
        "{params.python} -m pipeline_lib load --spec {params.spec:q} > {log} 2>&1"


rule aggregate:
    input:
        plan.load_records(),
    output:
        matrix="results/matrix.parquet",
        tensors="results/tensors.parquet",
    log:
        "results/logs/aggregate.log",
    localrule: True
    conda:
        "../envs/pipeline.yaml"
    params:
        python=PYTHON,
        git_commit=plan.git_commit,
    shell:
        "{params.python} -m pipeline_lib aggregate --matrix {output.matrix} --tensors {output.tensors}"
        " --git-commit {params.git_commit} {input} > {log} 2>&1"
