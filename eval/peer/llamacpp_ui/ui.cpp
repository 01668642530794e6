#include "ui.h"

const std::vector<llama_ui_asset> & llama_ui_get_assets() {
    static const std::vector<llama_ui_asset> none;
    return none;
}

const llama_ui_asset * llama_ui_find_asset(const std::string &) { return nullptr; }

bool llama_ui_use_gzip() { return false; }
