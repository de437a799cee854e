# {version_root}: results, or results/torch/<version> for a torch_versions environment. One job
# per layout runs every (variant, model) item: one record (and save folder) each. Each rule's
# callables are named after it (pipeline_lib.plan.snakemake_view.Plan).
rule save_checkpoints:
    input:
        plan.job_env_inputs,
    output:
        records=plan.save_job_records,
    log:
        "{version_root}/logs/save/{layout}.log",
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
    shell:
        "{params.python:q} -m pipeline_lib save --grid {params.grid:q} {params.reuse}"
        " --version-root {wildcards.version_root} --layout {wildcards.layout} > {log} 2>&1"


rule load_checkpoints:
    input:
        plan.load_job_inputs,
    output:
        records=plan.load_job_records,
    log:
        "{version_root}/logs/load/{layout}.log",
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
    shell:
        "{params.python:q} -m pipeline_lib load --grid {params.grid:q} {params.reuse}"
        " --version-root {wildcards.version_root} --layout {wildcards.layout} > {log} 2>&1"


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
