import transformers

transformers.utils.logging.disable_progress_bar()  # the weight-loading bars would drown the test reports
