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
        nodes=plan.slurm_nodes,
        tasks=plan.slurm_tasks,
        mpi=plan.slurm_mpi,
        gres=plan.slurm_gres,
        tasks_per_gpu=plan.slurm_tasks_per_gpu,
        cpus_per_task=plan.slurm_cpus_per_task,
        mem_mb=plan.slurm_mem_mb,
        runtime=plan.slurm_runtime,
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
        nodes=plan.slurm_nodes,
        tasks=plan.slurm_tasks,
        mpi=plan.slurm_mpi,
        gres=plan.slurm_gres,
        tasks_per_gpu=plan.slurm_tasks_per_gpu,
        cpus_per_task=plan.slurm_cpus_per_task,
        mem_mb=plan.slurm_mem_mb,
        runtime=plan.slurm_runtime,
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


rule save_fault_checkpoint:
    output:
        record="results/faults/{fault_id}/save/{model}/{layout}.json",
        save_dir=directory("results/faults/{fault_id}/save/{model}/{layout}"),
    log:
        "results/logs/faults/{fault_id}/save/{model}/{layout}.log",
    conda:
        "../envs/pipeline.yaml"
    threads: plan.threads
    resources:
        ranks=plan.ranks,
        nodes=plan.slurm_nodes,
        tasks=plan.slurm_tasks,
        mpi=plan.slurm_mpi,
        gres=plan.slurm_gres,
        tasks_per_gpu=plan.slurm_tasks_per_gpu,
        cpus_per_task=plan.slurm_cpus_per_task,
        mem_mb=plan.slurm_mem_mb,
        runtime=plan.slurm_runtime,
    params:
        python=PYTHON,
        spec=plan.fault_save_spec,
    shell:
        "{params.python} -m pipeline_lib save --spec {params.spec:q} > {log} 2>&1"


rule load_fault_checkpoint:
    input:
        plan.fault_load_inputs,
    output:
        record="results/faults/{fault_id}/load.json",
    log:
        "results/logs/faults/{fault_id}/load.log",
    conda:
        "../envs/pipeline.yaml"
    threads: plan.fault_load_threads
    resources:
        ranks=plan.fault_load_threads,
        nodes=plan.slurm_nodes,
        tasks=plan.slurm_tasks,
        mpi=plan.slurm_mpi,
        gres=plan.slurm_gres,
        tasks_per_gpu=plan.slurm_tasks_per_gpu,
        cpus_per_task=plan.slurm_cpus_per_task,
        mem_mb=plan.slurm_mem_mb,
        runtime=plan.slurm_runtime,
    params:
        python=PYTHON,
        spec=plan.fault_load_spec,
    shell:
        "{params.python} -m pipeline_lib load --spec {params.spec:q} > {log} 2>&1"


rule selftest_table:
    input:
        plan.fault_records(),
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
        "{params.python} -m pipeline_lib selftest --table {output.table}"
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
        "{params.python} -m pipeline_lib selftest --check {input} --ok {output} 2>&1 | tee {log}"
