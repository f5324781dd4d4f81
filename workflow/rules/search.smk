# Hyperparameter search (a grid with a `search` block, e.g. config/tuned.yaml; see
# docs/protocol.md): per data set x loss x size one Optuna study, searched by `workers`
# jobs on class-disjoint folds of the training classes (the test split is never read),
# reported (best.json, trials.csv, Optuna's plots), then the best parameters retrained for
# every seed (rule train, cells <label>+tuned) and the best trial's fold models tested as
# one ensemble (cells <label>+ensemble).


rule search_spec:
    """The study's search spec, from the grid (an edited search block rewrites it)."""
    output:
        study_folder("spec.yaml"),
    log:
        study_folder("spec.log"),
    localrule: True
    container:
        CONTAINER
    params:
        spec=study_json,
        write_spec=script("search_plan.py"),
    shell:
        "python {params.write_spec:q} {output:q} {params.spec:q} > {log:q} 2>&1"


rule search:
    """One worker on the study: trials until the budget is met (a killed one resumes it)."""
    input:
        study_folder("spec.yaml"),
    output:
        touch(study_folder("worker{worker}.done")),
    log:
        study_folder("worker{worker}.log"),
    container:
        CONTAINER
    threads: config["threads"]
    resources:
        gpu=study_gpus,
    params:
        launcher=study_launcher,
    shell:
        "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} "
        "{params.launcher} pml-plugins search {input:q} > {log:q} 2>&1"


rule search_report:
    """The best parameters, every trial, and Optuna's history and importance plots."""
    input:
        spec=study_folder("spec.yaml"),
        workers=expand(
            study_folder("worker{worker}.done"),
            worker=range(SEARCH.get("workers", 1)),
            allow_missing=True,
        ),
    output:
        best=report_file("best.json"),
        trials=report(
            report_file("trials.csv"),
            caption="../report/search.rst",
            category="Search",
        ),
        history=report(
            report_file("optimization_history.png"),
            caption="../report/search.rst",
            category="Search",
        ),
        importances=report(
            report_file("param_importances.png"),
            caption="../report/search.rst",
            category="Search",
        ),
    log:
        study_folder("report.log"),
    container:
        CONTAINER
    params:
        out=lambda wildcards, output: os.path.dirname(output.best),
    shell:
        "pml-plugins search-report {input.spec:q} --out {params.out:q} > {log:q} 2>&1"


rule ensemble:
    """The best trial's fold models, concatenated, evaluated once on the test split."""
    input:
        best=ensemble_best,
    output:
        metrics=f"{RUNS}/{{dataset}}/{{loss}}+ensemble/{{dim}}/seed0/metrics.json",
        config=f"{RUNS}/{{dataset}}/{{loss}}+ensemble/{{dim}}/seed0/config.yaml",
        manifest=f"{RUNS}/{{dataset}}/{{loss}}+ensemble/{{dim}}/seed0/manifest.json",
    log:
        f"{RUNS}/{{dataset}}/{{loss}}+ensemble/{{dim}}/seed0/ensemble.log",
    container:
        CONTAINER
    threads: config["threads"]
    params:
        out=lambda wildcards, output: os.path.dirname(output.metrics),
    shell:
        "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} "
        "pml-plugins ensemble {input.best:q} --out {params.out:q} > {log:q} 2>&1"


ruleorder: ensemble > train
