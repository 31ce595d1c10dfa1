# One rule per stage. Outputs are each stage's done.json, written last, after the stage's files.
# threads: all cores for the stages that run alone, half for those that can run two at a time
# (probes, sae, features, steering), a 1/n share for each of n capture shards.


rule examples:
    output:
        "examples/done.json",
    params:
        cfg=stage_params("examples"),
    threads: share_of_cores(1)
    log:
        "logs/examples.log",
    shell:
        stage_shell("examples")


rule model:
    input:
        "examples/done.json",
    output:
        "model/done.json",
    params:
        cfg=stage_params("model"),
    threads: share_of_cores(1)
    log:
        "logs/model.log",
    shell:
        stage_shell("model")


rule activation_shard:
    input:
        "model/done.json",
    output:
        temp("activations/shards/{shard}/done.json"),
    params:
        cfg=stage_params("activations"),
    threads: share_of_cores(SHARDS)
    log:
        "logs/activations.shard{shard}.log",
    shell:
        stage_shell("activations", " --shard {wildcards.shard}")


rule activations:
    input:
        "model/done.json",
        [f"activations/shards/{i}/done.json" for i in range(SHARDS)] if SHARDS > 1 else [],
    output:
        "activations/done.json",
    params:
        cfg=stage_params("activations"),
    threads: share_of_cores(1)
    log:
        "logs/activations.log",
    shell:
        stage_shell("activations")


rule probes:
    input:
        "activations/done.json",
    output:
        "probes/done.json",
    params:
        cfg=stage_params("probes"),
    threads: share_of_cores(2)
    log:
        "logs/probes.log",
    shell:
        stage_shell("probes")


rule sae:
    input:
        "activations/done.json",
    output:
        "sae/done.json",
    params:
        cfg=stage_params("sae"),
    threads: share_of_cores(2)
    log:
        "logs/sae.log",
    shell:
        stage_shell("sae")


rule features:
    input:
        "sae/done.json",
    output:
        "features/done.json",
    params:
        cfg=stage_params("features"),
    threads: share_of_cores(2)
    log:
        "logs/features.log",
    shell:
        stage_shell("features")


rule steering:
    input:
        "activations/done.json",
        # plans that steer with SAE features (SteerFeature, AblateFeatures) need the trained SAE and its analysis
        ["features/done.json"] if STEER_AFTER_FEATURES else [],
    output:
        "steering/done.json",
    params:
        cfg=stage_params("steering"),
    threads: share_of_cores(2)
    log:
        "logs/steering.log",
    shell:
        stage_shell("steering")


rule report:
    input:
        "probes/done.json",
        "features/done.json",
        "steering/done.json",
    output:
        "report/done.json",
    params:
        cfg=stage_params("report"),
    threads: share_of_cores(1)
    log:
        "logs/report.log",
    shell:
        stage_shell("report")
