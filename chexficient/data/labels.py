"""Label lists of the evaluation datasets, in each dataset's target-column order (the reference code's order).

The CheXpert 14 observations live in the model file (`modeling_chexficient.CHEXPERT_LABELS`, so that a model folder
carries them to the Space and the Hub) and are re-exported here.
"""

from __future__ import annotations

from modeling_chexficient import CHEXPERT_LABELS


LABELS: dict[str, list[str]] = {
    "chexpert": list(CHEXPERT_LABELS),
    "mimic": list(CHEXPERT_LABELS),
    "nih": [
        "Atelectasis",
        "Cardiomegaly",
        "Effusion",
        "Infiltration",
        "Mass",
        "Nodule",
        "Pneumonia",
        "Pneumothorax",
        "Consolidation",
        "Edema",
        "Emphysema",
        "Fibrosis",
        "Pleural Thickening",
        "Hernia",
        "No Finding",
    ],
    "vindr_cxr": [
        "Aortic enlargement",
        "Atelectasis",
        "Calcification",
        "Cardiomegaly",
        "Clavicle fracture",
        "Consolidation",
        "Edema",
        "Emphysema",
        "Enlarged PA (Pulmonary Artery)",
        "ILD (Interstitial Lung Disease)",
        "Infiltration",
        "Lung Opacity",
        "Lung cavity",
        "Lung cyst",
        "Mediastinal shift",
        "Nodule/Mass",
        "Pleural effusion",
        "Pleural thickening",
        "Pneumothorax",
        "Pulmonary fibrosis",
        "Rib fracture",
        "COPD (Chronic Obstructive Pulmonary Disease)",
        "Lung tumor",
        "Pneumonia",
        "Tuberculosis",
        "Other lesion",
        "Other disease",
        "No finding",
    ],
    "vindr_pcxr": [
        "Bronchitis",
        "Bronchopneumonia",
        "Bronchiolitis",
        "Situs inversus",
        "Pneumonia",
        "Pleuropneumonia",
        "Diaphragmatic hernia",
        "Tuberculosis",
        "Congenital emphysema",
        "CPAM (Congenital Pulmonary Airway Malformation)",
        "Hyaline membrane disease",
        "Mediastinal tumor",
        "Lung tumor",
        "Other disease",
        "No finding",
    ],
    "siim_ptx": ["Pneumothorax"],
    "pneumonia2017": ["Pneumonia"],
    "tbx11k": ["Tuberculosis"],
}


__all__ = ["CHEXPERT_LABELS", "LABELS"]
