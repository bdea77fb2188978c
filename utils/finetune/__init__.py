"""Fine-tuning a backbone with interpretability maximisation (IP_training/IP_finetune.py): surgery (which parameters
train; the network resumed from a cached input), augment (the training views and loaders), objective (the live concept
head, the gradient scale, the lr schedule), trainer (FinetuneConfig -> plan -> FineTuner -> run), record (reading a
run's finetune.json, its commit point), unseen (the unseen concepts' images, disjoint from the training ones), compare
(the comparison table of scored runs, paired per seed)."""
