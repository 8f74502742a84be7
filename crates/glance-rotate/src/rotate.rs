//! The rotation: a read-only [`plan`] (which images are archived under which
//! names, which members move, which old archives go), then its execution.
//!
//! Decisions, with the reason for each:
//! - Candidates are the images named exactly like the new image, with the
//!   same owner, not the new image, not created after it, and `active` or
//!   `deactivated`. Images still being uploaded or imported (`queued`,
//!   `saving`, `uploading`, `importing`) may be another build's work in
//!   progress and are left alone, as are hidden images of that name.
//! - Members move before the rename: a half-done rotation leaves the old
//!   image under its name, so a rerun finds it again and finishes (rename is
//!   the last step of each image). Members are added to the new image and
//!   accepted before they are removed from the old one, so no member ever
//!   loses access. The new image's members are read once, so a rerun adds
//!   nobody twice.
//! - A `public` or `community` new image needs no members (everyone sees it);
//!   members then stay on the archive.
//! - Archived images get the properties `packuilon_archive_of` (the name)
//!   and `packuilon_archived_at`; KEEP_ARCHIVES counts those archives (of this
//!   owner), newest by creation first, and never deletes one that still has
//!   members or is protected.
//! - An archive name already used by an image of the same owner gets a suffix
//!   ` (2)`, ` (3)`, ... (several rotations on one day).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use chrono::{DateTime, Local, Utc};
use futures::stream::{self, StreamExt, TryStreamExt};
use serde_json::json;

use crate::glance::{Glance, Hidden, Image, Member, PatchOp};
use crate::{Report, RotateError, RotateOptions, Target};

/// Property naming the image an archive was made from.
pub const ARCHIVE_OF: &str = "packuilon_archive_of";
/// Property holding when an image was archived (RFC 3339, UTC).
pub const ARCHIVED_AT: &str = "packuilon_archived_at";

/// Requests in flight at once while executing (Glance serialises writes on
/// its database anyway; a few in flight hide the round trips).
const CONCURRENCY: usize = 4;

/// An older image to archive.
#[derive(Debug, Clone)]
pub(crate) struct PlannedArchive {
    pub image: Image,
    pub archive_name: String,
    /// Members to move to the new image (empty when the new image needs none).
    pub members: Vec<Member>,
}

/// What a rotation will do. Made by [`plan`] with read-only requests.
#[derive(Debug, Clone)]
pub struct Plan {
    pub(crate) new_image: Image,
    /// Make the (private) new image `shared` first.
    pub(crate) share_new: bool,
    /// Members to add to the new image.
    pub(crate) add: Vec<String>,
    /// Members of the new image to set `accepted` (the added ones included).
    pub(crate) accept: Vec<String>,
    /// Oldest first.
    pub(crate) archives: Vec<PlannedArchive>,
    /// Archives beyond KEEP_ARCHIVES to delete.
    pub(crate) delete: Vec<Image>,
    /// Archives beyond KEEP_ARCHIVES that stay: (id, reason).
    pub(crate) kept: Vec<(String, String)>,
    /// Images of the name not touched: (id, reason).
    pub(crate) left_alone: Vec<(String, String)>,
    archived_at: DateTime<Utc>,
    hide: bool,
}

/// Renders ARCHIVE_NAME: `{name}`, `{date}` (YYYY-MM-DD) and `{datetime}`
/// (YYYY-MM-DDTHH:MM:SS), in local time like the original's `date`.
pub fn archive_name(template: &str, name: &str, now: DateTime<Local>) -> String {
    template
        .replace("{date}", &now.format("%Y-%m-%d").to_string())
        .replace("{datetime}", &now.format("%Y-%m-%dT%H:%M:%S").to_string())
        .replace("{name}", name)
}

/// `base`, `base (2)`, `base (3)`, ...
fn suffixed(base: &str, n: usize) -> String {
    if n <= 1 {
        base.to_string()
    } else {
        format!("{base} ({n})")
    }
}

/// Finds the new image: by ID (it must be active and named), or the newest
/// active image of a name. `Ok(None)`: no image of that name.
pub async fn new_image(glance: &Glance, target: &Target) -> Result<Option<Image>, RotateError> {
    match target {
        Target::ImageId(id) => {
            let img = glance.image(id).await.map_err(|e| match e.status() {
                Some(404) => RotateError::NewImage(format!("new image {id}: not found in Glance")),
                _ => e,
            })?;
            if img.status != "active" {
                return Err(RotateError::NewImage(format!(
                    "new image {id} ({:?}) is {}, not active: not rotating for it",
                    img.name(),
                    img.status
                )));
            }
            if img.name().is_empty() {
                return Err(RotateError::NewImage(format!("new image {id} has no name")));
            }
            Ok(Some(img))
        }
        Target::Name { name, created_after } => {
            if name.trim().is_empty() {
                return Err(RotateError::NewImage("empty image name".into()));
            }
            let after = match created_after {
                Some(s) => Some(
                    DateTime::parse_from_rfc3339(s)
                        .map_err(|e| RotateError::NewImage(format!("created_after {s:?}: {e}")))?
                        .with_timezone(&Utc),
                ),
                None => None,
            };
            let images = glance.list_named(name, Hidden::No, &[("status", "active")]).await?;
            // Glance keeps whole seconds: an image made in the build's first second counts.
            let after_floor = after.map(|t| t - chrono::Duration::nanoseconds(t.timestamp_subsec_nanos() as i64));
            Ok(images
                .into_iter()
                .filter(|i| i.status == "active")
                .filter(|i| match (after_floor, i.created()) {
                    (Some(a), Some(c)) => c >= a,
                    (Some(_), None) => false,
                    (None, _) => true,
                })
                // Newest first (Glance sorts by created_at, then id): the first one is the new image.
                .min_by(|a, b| b.created().cmp(&a.created())))
        }
    }
}

/// Works out what to do; changes nothing. `Ok(None)`: no new image (nothing to do).
pub async fn plan(glance: &Glance, target: &Target, opts: &RotateOptions) -> Result<Option<Plan>, RotateError> {
    let Some(new) = new_image(glance, target).await? else {
        return Ok(None);
    };
    plan_for(glance, new, opts).await.map(Some)
}

/// The plan for `new` (a real image, or [`preview`]'s stand-in).
async fn plan_for(glance: &Glance, new: Image, opts: &RotateOptions) -> Result<Plan, RotateError> {
    let name = new.name().to_string();
    let owner = new.owner.clone();
    let owner_filter: Vec<(&str, &str)> = owner.as_deref().map(|o| vec![("owner", o)]).unwrap_or_default();
    let new_created = new.created();

    let mut left_alone = Vec::new();
    let mut candidates = Vec::new();
    for img in glance.list_named(&name, Hidden::No, &owner_filter).await? {
        if img.id == new.id || img.owner != owner {
            continue;
        }
        if img.created() > new_created {
            left_alone.push((
                img.id.clone(),
                format!("created {} after the new image", img.created_at),
            ));
        } else if !matches!(img.status.as_str(), "active" | "deactivated") {
            left_alone.push((img.id.clone(), format!("status {}", img.status)));
        } else {
            candidates.push(img);
        }
    }
    candidates.sort_by(|a, b| a.created().cmp(&b.created()).then_with(|| a.id.cmp(&b.id)));

    // Members: the new image can receive them unless everyone sees it anyway.
    let new_takes_members = matches!(new.visibility.as_str(), "shared" | "private");
    let lists: Vec<_> = candidates
        .iter()
        .map(|img| members_to_move(glance, img, new_takes_members))
        .collect();
    let old_members: Vec<Vec<Member>> = stream::iter(lists).buffered(CONCURRENCY).try_collect().await?;
    let wanted: BTreeSet<String> = old_members.iter().flatten().map(|m| m.member_id.clone()).collect();
    let (add, accept) = members_to_give(glance, &new, &wanted).await?;
    let share_new = !wanted.is_empty() && new.visibility == "private";
    if !new_takes_members {
        for img in candidates.iter().filter(|i| i.visibility == "shared") {
            left_alone.push((
                img.id.clone(),
                format!("members stay: the new image is {}", new.visibility),
            ));
        }
    }

    // Archive names: free ones, oldest candidate first.
    let archived_at = Utc::now();
    let base = archive_name(&opts.archive_name, &name, archived_at.with_timezone(&Local));
    let names = free_names(glance, &base, candidates.len(), &owner_filter, owner.as_deref()).await?;
    let archives: Vec<PlannedArchive> = candidates
        .into_iter()
        .zip(old_members)
        .zip(names)
        .map(|((image, members), archive_name)| PlannedArchive {
            image,
            archive_name,
            members,
        })
        .collect();

    let (delete, kept) = match opts.keep_archives {
        Some(keep) => plan_pruning(glance, &name, &owner_filter, owner.as_deref(), &archives, keep as usize).await?,
        None => (Vec::new(), Vec::new()),
    };

    Ok(Plan {
        new_image: new,
        share_new,
        add,
        accept,
        archives,
        delete,
        kept,
        left_alone,
        archived_at,
        hide: opts.hide_archived,
    })
}

/// The ID [`preview`] gives the image it stands in for.
pub const PREVIEW_IMAGE_ID: &str = "(new image)";

/// What a rotation for a new image of `name` would do now (`plan --rotation`);
/// changes nothing. The new image is taken to be created now, private and
/// owned by `owner` (or, when `None`, by the owner of the newest active image
/// named `name`); its ID in the report is [`PREVIEW_IMAGE_ID`]. Like a real
/// build's image, it would be made `shared` to receive members.
pub async fn preview(
    glance: &Glance,
    name: &str,
    owner: Option<&str>,
    opts: &RotateOptions,
) -> Result<Report, RotateError> {
    if name.trim().is_empty() {
        return Err(RotateError::NewImage("empty image name".into()));
    }
    let before = glance.session().requests();
    let owner = match owner {
        Some(o) => Some(o.to_string()),
        None => glance
            .list_named(name, Hidden::No, &[("status", "active")])
            .await?
            .into_iter()
            .filter(|i| i.status == "active")
            .max_by(|a, b| a.created().cmp(&b.created()).then_with(|| a.id.cmp(&b.id)))
            .and_then(|i| i.owner),
    };
    let mut report = match owner {
        None => Report {
            name: name.to_string(),
            skipped: Some(format!(
                "no active image named {name:?} (give the new image's owner to preview its rotation)"
            )),
            ..Report::default()
        },
        Some(owner) => {
            let stand_in = Image {
                id: PREVIEW_IMAGE_ID.to_string(),
                name: Some(name.to_string()),
                owner: Some(owner),
                status: "active".into(),
                visibility: "private".into(),
                created_at: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                os_hidden: false,
                protected: false,
                extra: serde_json::Map::new(),
            };
            plan_for(glance, stand_in, opts).await?.report()
        }
    };
    report.dry_run = true;
    report.http_requests = glance.session().requests() - before;
    Ok(report)
}

/// `count` archive names starting at `base` that no image of the owner has.
async fn free_names(
    glance: &Glance,
    base: &str,
    count: usize,
    owner_filter: &[(&str, &str)],
    owner: Option<&str>,
) -> Result<Vec<String>, RotateError> {
    let mut free = Vec::with_capacity(count);
    let mut next = 1;
    while free.len() < count {
        // Ask for a few more than needed: earlier rotations today may hold some.
        let batch: Vec<String> = (next..next + (count - free.len()) + 2)
            .map(|n| suffixed(base, n))
            .collect();
        next += batch.len();
        let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
        let mut taken = HashSet::new();
        for hidden in [Hidden::No, Hidden::Yes] {
            for img in glance.list_names(&refs, hidden, owner_filter).await? {
                if img.owner.as_deref() == owner {
                    taken.insert(img.name().to_string());
                }
            }
        }
        free.extend(batch.into_iter().filter(|n| !taken.contains(n)));
    }
    free.truncate(count);
    Ok(free)
}

/// Which archives of `name` KEEP_ARCHIVES removes (the ones archived now included).
async fn plan_pruning(
    glance: &Glance,
    name: &str,
    owner_filter: &[(&str, &str)],
    owner: Option<&str>,
    now_archived: &[PlannedArchive],
    keep: usize,
) -> Result<(Vec<Image>, Vec<(String, String)>), RotateError> {
    let mut filter: Vec<(&str, &str)> = owner_filter.to_vec();
    filter.push((ARCHIVE_OF, name));
    let mut all: Vec<(Image, Option<usize>)> = Vec::new();
    for hidden in [Hidden::No, Hidden::Yes] {
        let mut f = filter.clone();
        if hidden == Hidden::Yes {
            f.push(("os_hidden", "true"));
        }
        for img in glance.list(&f).await? {
            if img.owner.as_deref() == owner && img.property(ARCHIVE_OF) == Some(name) {
                all.push((img, None));
            }
        }
    }
    for (i, a) in now_archived.iter().enumerate() {
        all.push((a.image.clone(), Some(i)));
    }
    all.sort_by(|a, b| b.0.created().cmp(&a.0.created()).then_with(|| b.0.id.cmp(&a.0.id)));
    all.dedup_by(|a, b| a.0.id == b.0.id);
    let mut delete = Vec::new();
    let mut kept = Vec::new();
    for (img, planned) in all.into_iter().skip(keep) {
        if img.protected {
            kept.push((img.id.clone(), "protected".to_string()));
            continue;
        }
        let has_members = match planned {
            // Its members move to the new image now, unless the new image takes none.
            Some(i) => {
                img.visibility == "shared" && now_archived[i].members.is_empty() && {
                    !glance.members(&img.id).await?.is_empty()
                }
            }
            None => img.visibility == "shared" && !glance.members(&img.id).await?.is_empty(),
        };
        if has_members {
            kept.push((img.id.clone(), "still has members".to_string()));
        } else {
            delete.push(img);
        }
    }
    Ok((delete, kept))
}

impl Plan {
    /// The plan as a report (what will be done).
    pub(crate) fn report(&self) -> Report {
        let new = &self.new_image;
        Report {
            new_image_id: new.id.clone(),
            name: new.name().to_string(),
            archived: self
                .archives
                .iter()
                .map(|a| (a.image.id.clone(), a.image.name().to_string(), a.archive_name.clone()))
                .collect(),
            members_moved: self
                .archives
                .iter()
                .flat_map(|a| {
                    a.members
                        .iter()
                        .map(|m| (m.member_id.clone(), a.image.id.clone(), new.id.clone()))
                })
                .collect(),
            deleted: self.delete.iter().map(|i| i.id.clone()).collect(),
            skipped: (self.archives.is_empty() && self.delete.is_empty())
                .then(|| format!("no older image named {:?} to archive", new.name())),
            left_alone: self.left_alone.clone(),
            kept: self.kept.clone(),
            shared_new_image: self.share_new,
            dry_run: false,
            http_requests: 0,
        }
    }

    /// Logs what the plan would do (for `--dry-run`).
    pub(crate) fn log(&self) {
        let new = &self.new_image;
        tracing::info!(
            "Plan for {:?}: new image {} (owner {})",
            new.name(),
            new.id,
            new.owner.as_deref().unwrap_or("none")
        );
        if self.share_new {
            tracing::info!("Would make image {} shared to receive members", new.id);
        }
        for m in &self.add {
            tracing::info!("Would add member {m} to image {}", new.id);
        }
        for a in &self.archives {
            for m in &a.members {
                tracing::info!(
                    "Would move member {} from image {} to image {}",
                    m.member_id,
                    a.image.id,
                    new.id
                );
            }
            tracing::info!(
                "Would rename image {} from {:?} to {:?}",
                a.image.id,
                a.image.name(),
                a.archive_name
            );
        }
        for i in &self.delete {
            tracing::info!("Would delete archived image {} {:?}", i.id, i.name());
        }
        for (id, why) in &self.kept {
            tracing::info!("Would keep archived image {id}: {why}");
        }
        for (id, why) in &self.left_alone {
            tracing::info!("Leaving image {id} alone: {why}");
        }
        if self.archives.is_empty() {
            tracing::info!("Nothing to archive for {:?}", new.name());
        }
    }

    /// Carries the plan out. Every step tolerates having been done already.
    pub(crate) async fn execute(&self, glance: &Glance) -> Result<Report, RotateError> {
        let new = &self.new_image;
        if self.share_new {
            glance.make_shared(new).await?;
        }
        // Futures collected first (not a closure in the stream): keeps the whole rotation Send.
        let adds: Vec<_> = self.add.iter().map(|m| add_member(glance, &new.id, m)).collect();
        run_all(adds).await?;
        let accepts: Vec<_> = self.accept.iter().map(|m| accept_member(glance, &new.id, m)).collect();
        run_all(accepts).await?;

        let archived_at = self.archived_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let archives: Vec<_> = self
            .archives
            .iter()
            .map(|a| archive_one(glance, a, new, &archived_at, self.hide))
            .collect();
        run_all(archives).await?;

        for img in &self.delete {
            if glance.delete_image(&img.id).await? {
                tracing::info!("Deleted archived image {} {:?} (KEEP_ARCHIVES)", img.id, img.name());
            }
        }
        for (id, why) in &self.kept {
            tracing::info!("Kept archived image {id} beyond KEEP_ARCHIVES: {why}");
        }
        if self.archives.is_empty() {
            tracing::info!(
                "No older image named {:?} to archive (new image {})",
                new.name(),
                new.id
            );
        }
        Ok(self.report())
    }
}

/// What `to` still needs to hold every one of `wanted` as an accepted
/// member: (members to add, members to set `accepted`, the added ones
/// included). Its members are read once (a private image has none), so a
/// rerun adds nobody twice.
pub(crate) async fn members_to_give(
    glance: &Glance,
    to: &Image,
    wanted: &BTreeSet<String>,
) -> Result<(Vec<String>, Vec<String>), RotateError> {
    let present: BTreeMap<String, String> = if !wanted.is_empty() && to.visibility == "shared" {
        glance
            .members(&to.id)
            .await?
            .into_iter()
            .map(|m| (m.member_id, m.status))
            .collect()
    } else {
        BTreeMap::new()
    };
    let add = wanted.iter().filter(|m| !present.contains_key(*m)).cloned().collect();
    let accept = wanted
        .iter()
        .filter(|m| present.get(*m).map(String::as_str) != Some("accepted"))
        .cloned()
        .collect();
    Ok((add, accept))
}

/// Members of `img` that move to the new image (only shared images have members).
async fn members_to_move(glance: &Glance, img: &Image, new_takes_members: bool) -> Result<Vec<Member>, RotateError> {
    if new_takes_members && img.visibility == "shared" {
        glance.members(&img.id).await
    } else {
        Ok(Vec::new())
    }
}

async fn add_member(glance: &Glance, new_id: &str, member: &str) -> Result<(), RotateError> {
    if glance.add_member(new_id, member).await? {
        tracing::info!("Added member {member} to image {new_id}");
    }
    Ok(())
}

async fn accept_member(glance: &Glance, new_id: &str, member: &str) -> Result<(), RotateError> {
    glance.set_member_status(new_id, member, "accepted").await?;
    tracing::info!("Member {member} of image {new_id} accepted");
    Ok(())
}

/// Moves the members of one old image, then renames it (last: once renamed,
/// a rerun no longer finds it by name).
async fn archive_one(
    glance: &Glance,
    a: &PlannedArchive,
    new: &Image,
    archived_at: &str,
    hide: bool,
) -> Result<(), RotateError> {
    let old = &a.image;
    for m in &a.members {
        glance.remove_member(&old.id, &m.member_id).await?;
        tracing::info!("Moved member {} from image {} to image {}", m.member_id, old.id, new.id);
    }
    let mut ops = vec![
        PatchOp::Set {
            path: "/name".into(),
            value: json!(a.archive_name),
            exists: true,
        },
        PatchOp::Set {
            path: format!("/{ARCHIVE_OF}"),
            value: json!(old.name()),
            exists: old.extra.contains_key(ARCHIVE_OF),
        },
        PatchOp::Set {
            path: format!("/{ARCHIVED_AT}"),
            value: json!(archived_at),
            exists: old.extra.contains_key(ARCHIVED_AT),
        },
    ];
    if hide && !old.os_hidden {
        ops.push(PatchOp::Set {
            path: "/os_hidden".into(),
            value: json!(true),
            exists: true,
        });
    }
    glance.patch(&old.id, &ops).await?;
    tracing::info!(
        "Renamed image {} from {:?} to {:?}{}",
        old.id,
        old.name(),
        a.archive_name,
        if hide { " (hidden)" } else { "" }
    );
    Ok(())
}

/// Runs `futs`, CONCURRENCY at a time; stops at the first error.
async fn run_all<F>(futs: Vec<F>) -> Result<(), RotateError>
where
    F: std::future::Future<Output = Result<(), RotateError>>,
{
    stream::iter(futs)
        .buffer_unordered(CONCURRENCY)
        .try_collect::<()>()
        .await
}

/// Plans and (unless `opts.dry_run`) executes the rotation for `target`.
pub async fn rotate(glance: &Glance, target: Target, opts: &RotateOptions) -> Result<Report, RotateError> {
    let before = glance.session().requests();
    let plan = plan(glance, &target, opts).await?;
    let mut report = match plan {
        None => {
            let what = match &target {
                Target::ImageId(id) => format!("image {id}"),
                Target::Name {
                    name,
                    created_after: Some(t),
                } => format!("no active image named {name:?} created at or after {t}"),
                Target::Name { name, .. } => format!("no active image named {name:?}"),
            };
            tracing::warn!("Nothing to rotate: {what}");
            Report {
                name: match &target {
                    Target::Name { name, .. } => name.clone(),
                    Target::ImageId(_) => String::new(),
                },
                skipped: Some(what),
                dry_run: opts.dry_run,
                ..Report::default()
            }
        }
        Some(plan) if opts.dry_run => {
            plan.log();
            let mut r = plan.report();
            r.dry_run = true;
            r
        }
        Some(plan) => plan.execute(glance).await?,
    };
    report.http_requests = glance.session().requests() - before;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn archive_names_follow_the_template() {
        let t = Local.with_ymd_and_hms(2026, 3, 4, 5, 6, 7).unwrap();
        assert_eq!(
            archive_name("archive-{name} {date}", "sl7x-x86_64 inventory", t),
            "archive-sl7x-x86_64 inventory 2026-03-04"
        );
        assert_eq!(
            archive_name("old {name} {datetime}", "x", t),
            "old x 2026-03-04T05:06:07"
        );
        // A name holding a placeholder is not expanded again.
        assert_eq!(archive_name("a-{name}", "{date}", t), "a-{date}");
        assert_eq!(suffixed("a", 1), "a");
        assert_eq!(suffixed("a", 3), "a (3)");
    }
}
