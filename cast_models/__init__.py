"""The models the project serves in tests and demos: tiny random pairs (tiny.py), the reference pair's training
(train_reference.py, `cast train-reference`) and the HumanEval prompts it holds out and is evaluated on."""
