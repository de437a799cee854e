# One job per layout runs every (variant, model) item and writes one record per item (and its
# save folder, not an output: a rerun keeps the folders of unchanged items). The jobs of the
# pipeline's own torch write under results, those of a torch_versions environment under
# results/torch/{version} (the same rules there: *_in_torch_env); a variant other than the
# default writes below axes/<variant id> (ITEMS["axes"]: that folder with a slash before it, or
# nothing). Each rule's callables are named after it (pipeline_lib.plan.snakemake_view.Plan).
ITEMS = plan.item_folders


rule save_checkpoints:
    input:
        plan.job_env_inputs,
    output:
        records=expand("results{axes}/save/{model}/{{layout}}.json", zip, **ITEMS),
    log:
        "results/logs/save/{layout}.log",
    conda:
        "../envs/pipeline.yaml"
    threads: plan.job_ranks
    resources:
        **plan.job_resources,
    params:
        python=plan.job_python,
        grid=plan.grid_json,
        inputs=plan.code_and_environment,
        reuse=plan.save_job_reuse,
        root=plan.job_root,
    shell:
        "{params.python:q} -m pipeline_lib save --grid {params.grid:q} {params.reuse}"
        " --version-root {params.root} --layout {wildcards.layout} > {log} 2>&1"


use rule save_checkpoints as save_checkpoints_in_torch_env with:
    output:
        records=expand("results/torch/{{version}}{axes}/save/{model}/{{layout}}.json", zip, **ITEMS),
    log:
        "results/torch/{version}/logs/save/{layout}.log",


rule load_checkpoints:
    input:
        plan.load_job_inputs,
    output:
        records=expand("results{axes}/load/{model}/{{layout}}.json", zip, **ITEMS),
    log:
        "results/logs/load/{layout}.log",
    conda:
        "../envs/pipeline.yaml"
    threads: plan.job_ranks
    resources:
        **plan.job_resources,
    params:
        python=plan.job_python,
        grid=plan.grid_json,
        inputs=plan.code_and_environment,
        reuse=plan.load_job_reuse,
        root=plan.job_root,
    shell:
        "{params.python:q} -m pipeline_lib load --grid {params.grid:q} {params.reuse}"
        " --version-root {params.root} --layout {wildcards.layout} > {log} 2>&1"


use rule load_checkpoints as load_checkpoints_in_torch_env with:
    output:
        records=expand("results/torch/{{version}}{axes}/load/{model}/{{layout}}.json", zip, **ITEMS),
    log:
        "results/torch/{version}/logs/load/{layout}.log",


# An existing checkpoint (config key checkpoints): read without a process group into the
# reference of its load cells (results/existing/{checkpoint}/reference, not an output: an
# import whose inputs did not change keeps it); the checkpoint folder itself is only read.
rule import_checkpoint:
    input:
        plan.existing_files,
    output:
        record="results/existing/{checkpoint}.json",
    log:
        "results/logs/import/{checkpoint}.log",
    wildcard_constraints:
        checkpoint=plan.checkpoint_pattern,
    conda:
        "../envs/pipeline.yaml"
    params:
        python=PYTHON,
        grid=plan.grid_json,
        inputs=plan.code_and_environment,
        reuse=plan.import_reuse,
    shell:
        "{params.python:q} -m pipeline_lib import-checkpoint --grid {params.grid:q} {params.reuse}"
        " --name {wildcards.checkpoint} > {log} 2>&1"


rule torch_env:
    output:
        packages=f"{plan.env_dir}/{{version}}/packages.txt",
    log:
        "results/logs/torch_env/{version}.log",
    conda:
        "../envs/pipeline.yaml"
    params:
        python=PYTHON,
        requirement=plan.torch_requirement,
        prefix=plan.torch_env_prefix,
        packages=plan.torch_env_packages,
    shell:
        "{params.python:q} -m pipeline_lib make-env --requirement {params.requirement:q}"
        " --prefix {params.prefix:q} > {log} 2>&1"


rule aggregate:
    input:
        plan.load_record_paths(),
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
        "{params.python:q} -m pipeline_lib aggregate --matrix {output.matrix} --tensors {output.tensors}"
        " --git-commit {params.git_commit} {input} > {log} 2>&1"


rule save_fault_checkpoint:
    output:
        record="results/faults/{fault_id}/save/{model}/{layout}.json",
        save_dir=directory("results/faults/{fault_id}/save/{model}/{layout}"),
    log:
        "results/logs/faults/{fault_id}/save/{model}/{layout}.log",
    conda:
        "../envs/pipeline.yaml"
    threads: plan.job_ranks
    resources:
        **plan.fault_save_resources,
    params:
        python=PYTHON,
        spec=plan.fault_save_spec,
    shell:
        "{params.python:q} -m pipeline_lib save --spec {params.spec:q} > {log} 2>&1"


rule load_fault_checkpoint:
    input:
        plan.fault_load_inputs,
    output:
        record="results/faults/{fault_id}/load.json",
    log:
        "results/logs/faults/{fault_id}/load.log",
    conda:
        "../envs/pipeline.yaml"
    threads: plan.fault_load_ranks
    resources:
        **plan.fault_load_resources,
    params:
        python=PYTHON,
        spec=plan.fault_load_spec,
    shell:
        "{params.python:q} -m pipeline_lib load --spec {params.spec:q} > {log} 2>&1"


rule selftest_table:
    input:
        plan.fault_record_paths(),
    output:
        table="results/selftest.parquet",
        markdown="results/selftest.md",
    log:
        "results/logs/selftest_table.log",
    localrule: True
    conda:
        "../envs/pipeline.yaml"
    params:
        python=PYTHON,
    shell:
        "{params.python:q} -m pipeline_lib selftest --table {output.table}"
        " --markdown {output.markdown} {input} > {log} 2>&1"


rule selftest_check:
    input:
        "results/selftest.parquet",
    output:
        "results/selftest.ok",
    log:
        "results/logs/selftest_check.log",
    localrule: True
    conda:
        "../envs/pipeline.yaml"
    params:
        python=PYTHON,
    shell:
        "{params.python:q} -m pipeline_lib selftest --check {input} --ok {output} 2>&1 | tee {log}"
