//! PodDisruptionBudgets.

use super::*;

pub(super) fn pdb(ctx: &Ctx, role: Role) -> PodDisruptionBudget {
    let budget = &ctx.p.spec.availability.disruption_budget;
    let (min_available, max_unavailable) = match (&budget.min_available, &budget.max_unavailable) {
        (None, None) => (None, Some(IntOrString::Int(1))),
        (min, max) => (min.clone(), max.clone()),
    };
    PodDisruptionBudget {
        metadata: ctx.meta(role.as_str(), role.as_str()),
        spec: Some(PodDisruptionBudgetSpec {
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&ctx.name, role.as_str())),
                ..LabelSelector::default()
            }),
            min_available,
            max_unavailable,
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}
