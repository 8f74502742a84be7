//! Rollback (`rename-old-images --rollback NAME`): the newest archive of a
//! name becomes live again. The live image is renamed BROKEN_NAME (private,
//! tagged like an image that failed its test), its members move back to the
//! restored image, and the restored image takes the name and loses its
//! archive tags. Nothing of other names is touched.
//!
//! The steps, in an order that a rerun can always finish:
//! 1. the live image's members are added to the archive (made `shared`
//!    first if it is private) and accepted;
//! 2. they are removed from the live image;
//! 3. the live image is tagged `packuilon_rolled_back_to=<archive id>`, then
//!    renamed BROKEN_NAME, made private and tagged `packuilon_broken_of` and
//!    `packuilon_broken_at` ([`gate::mark_broken`]);
//! 4. the archive takes the name, loses `packuilon_archive_of` and
//!    `packuilon_archived_at`, is unhidden and tagged
//!    `packuilon_restored_from=<broken image id>` (one request).
//!
//! Stopped before step 3, the live image still has the name and the archive
//! is still the newest: a rerun redoes steps 1-2 (each checks what is done).
//! Stopped between 3 and 4, no image has the name: a rerun finds the newest
//! broken image of the name whose `packuilon_rolled_back_to` archive is still
//! an archive, and finishes step 4 on that one (never on another archive).
//!
//! Idempotence: a live image tagged `packuilon_restored_from` is the result
//! of a rollback, so `--rollback` again changes nothing and says "already
//! rolled back". To go back one more archive, [`rollback_again`]
//! (`--rollback --again`) takes the restored image off the name too.
//!
//! Which images count: the live image is the newest active, visible image
//! named exactly NAME (older ones of the name are left alone, and reported;
//! active images of the name in several projects are an error, not a guess).
//! Archives are images of the same owner tagged `packuilon_archive_of=NAME`,
//! hidden or not; the newest by `packuilon_archived_at` (then creation)
//! that is `active` is restored. With no live image and nothing to finish
//! there is nothing to roll back (an error: rename the archive by hand).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Local, Utc};
use serde_json::json;

use crate::gate::{self, BROKEN_AT, BROKEN_OF};
use crate::glance::{Glance, Hidden, Image, PatchOp};
use crate::rotate::{ARCHIVED_AT, ARCHIVE_OF};
use crate::{RotateError, RotateOptions};

/// Property of the image a rollback took off its name: the image restored instead.
pub const ROLLED_BACK_TO: &str = "packuilon_rolled_back_to";
/// Property of a restored image: the image it took the name back from.
pub const RESTORED_FROM: &str = "packuilon_restored_from";

/// What a rollback did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RollbackReport {
    pub name: String,
    /// The archive that takes the name (the live image when `already_done`).
    pub restored_image_id: String,
    /// Its name before the rollback (its archive name).
    pub restored_image_old_name: String,
    /// The image taken off the name; `None` when no image had it.
    pub broken_image_id: Option<String>,
    /// Its new name (BROKEN_NAME).
    pub broken_name: Option<String>,
    /// Member projects moved from the broken image to the restored one.
    pub members_moved: Vec<String>,
    /// The restored image was private and was made `shared` to receive members.
    pub shared_restored_image: bool,
    /// A rollback stopped after renaming the live image: this run finished it.
    pub resumed: bool,
    /// The live image is already the result of a rollback: nothing done.
    pub already_done: bool,
    /// Images not touched, and why: (image id, reason).
    pub left_alone: Vec<(String, String)>,
    /// This report is a plan: nothing was changed.
    pub dry_run: bool,
    /// HTTP requests made (Keystone and Glance).
    pub http_requests: u64,
}

impl RollbackReport {
    /// The report as operators read it, one line per action (for a dry
    /// run: what would be done).
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let r = self;
        let mut out = String::new();
        let broken = r.broken_image_id.as_deref().unwrap_or("?");
        let broken_name = r.broken_name.as_deref().unwrap_or("?");
        if r.already_done {
            let _ = writeln!(
                out,
                "already rolled back: image {} has the name {:?} (restored from image {broken} {broken_name:?}); nothing to do",
                r.restored_image_id, r.name
            );
            let _ = writeln!(out, "(--rollback --again goes back one more archive)");
        } else if r.dry_run {
            if r.resumed {
                let _ = writeln!(out, "finish the rollback that renamed {broken} {broken_name:?}");
            }
            if r.shared_restored_image {
                let _ = writeln!(out, "share {} (private, has members to receive)", r.restored_image_id);
            }
            if !r.resumed {
                for m in &r.members_moved {
                    let _ = writeln!(out, "move member {m} from {broken} to {}", r.restored_image_id);
                }
                let _ = writeln!(out, "rename {broken} {:?} -> {broken_name:?} (private)", r.name);
            }
            let _ = writeln!(
                out,
                "rename {} {:?} -> {:?}",
                r.restored_image_id, r.restored_image_old_name, r.name
            );
        } else {
            let _ = writeln!(
                out,
                "rolled back {:?}: image {} (was {:?}) has the name; image {broken} is now {broken_name:?}{}",
                r.name,
                r.restored_image_id,
                r.restored_image_old_name,
                if r.members_moved.is_empty() {
                    String::new()
                } else {
                    format!(", {} member(s) moved", r.members_moved.len())
                }
            );
        }
        for (id, why) in &r.left_alone {
            let _ = writeln!(out, "leave {id}: {why}");
        }
        out
    }
}

/// What is left to do.
struct Steps {
    name: String,
    /// The image to take off the name (steps 1-3); `None` when resuming.
    live: Option<Image>,
    /// Its BROKEN_NAME (or the name it has, when resuming).
    broken_name: Option<String>,
    /// The broken image, when resuming at step 4.
    broken: Option<Image>,
    restore: Image,
    share_restore: bool,
    add: Vec<String>,
    accept: Vec<String>,
    /// Members of the live image to remove once the restored image has them.
    remove: Vec<String>,
    left_alone: Vec<(String, String)>,
}

/// Rolls `name` back to its newest archive (see the module doc); with
/// `opts.dry_run` only reports what it would do.
pub async fn rollback(glance: &Glance, name: &str, opts: &RotateOptions) -> Result<RollbackReport, RotateError> {
    run(glance, name, opts, false).await
}

/// As [`rollback`], but a live image that a rollback restored is taken off
/// the name too: each call goes back one more archive.
pub async fn rollback_again(glance: &Glance, name: &str, opts: &RotateOptions) -> Result<RollbackReport, RotateError> {
    run(glance, name, opts, true).await
}

async fn run(glance: &Glance, name: &str, opts: &RotateOptions, again: bool) -> Result<RollbackReport, RotateError> {
    if name.trim().is_empty() {
        return Err(RotateError::NewImage("empty image name".into()));
    }
    let before = glance.session().requests();
    let mut report = match plan(glance, name, opts, again).await? {
        Planned::Done(r) => r,
        Planned::Todo(steps) if opts.dry_run => {
            steps.log();
            steps.report(true)
        }
        Planned::Todo(steps) => steps.execute(glance).await?,
    };
    report.http_requests = glance.session().requests() - before;
    Ok(report)
}

enum Planned {
    Done(RollbackReport),
    Todo(Box<Steps>),
}

fn parse_time(s: Option<&str>) -> Option<DateTime<Utc>> {
    s.and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// Works out the steps left; read-only.
async fn plan(glance: &Glance, name: &str, opts: &RotateOptions, again: bool) -> Result<Planned, RotateError> {
    let mut left_alone = Vec::new();
    let mut named: Vec<Image> = Vec::new();
    for img in glance.list_named(name, Hidden::No, &[]).await? {
        if img.status == "active" {
            named.push(img);
        } else {
            left_alone.push((img.id.clone(), format!("named {name:?} but {}", img.status)));
        }
    }
    let owners: BTreeSet<&str> = named.iter().map(|i| i.owner.as_deref().unwrap_or("none")).collect();
    if owners.len() > 1 {
        return Err(RotateError::NothingToRollBack(format!(
            "active images named {name:?} belong to several projects ({}): not guessing which to roll back",
            owners.into_iter().collect::<Vec<_>>().join(", ")
        )));
    }
    named.sort_by(|a, b| b.created().cmp(&a.created()).then_with(|| b.id.cmp(&a.id)));
    let mut named = named.into_iter();
    let live = named.next();
    for img in named {
        left_alone.push((
            img.id.clone(),
            format!("an older image named {name:?}: only the newest is rolled back"),
        ));
    }

    let Some(live) = live else {
        return plan_without_live(glance, name, left_alone).await;
    };

    if let Some(from) = live.property(RESTORED_FROM).filter(|_| !again) {
        let from = from.to_string();
        let from_name = match glance.image(&from).await {
            Ok(img) => Some(img.name().to_string()),
            Err(e) if e.status() == Some(404) => None,
            Err(e) => return Err(e),
        };
        tracing::info!(
            "{name:?} is already rolled back: image {} took the name from image {from}; nothing to do",
            live.id
        );
        return Ok(Planned::Done(RollbackReport {
            name: name.to_string(),
            restored_image_id: live.id.clone(),
            restored_image_old_name: String::new(),
            broken_image_id: Some(from),
            broken_name: from_name,
            already_done: true,
            left_alone,
            dry_run: opts.dry_run,
            ..RollbackReport::default()
        }));
    }

    let owner = live.owner.clone();
    let mut filter: Vec<(&str, &str)> = vec![(ARCHIVE_OF, name)];
    if let Some(o) = owner.as_deref() {
        filter.push(("owner", o));
    }
    let archives: Vec<Image> = glance
        .list_visible_and_hidden(&filter)
        .await?
        .into_iter()
        .filter(|i| i.owner == owner && i.property(ARCHIVE_OF) == Some(name) && i.id != live.id)
        .collect();
    let restore = newest_archive(archives, name, &mut left_alone)?;

    // Members: only a shared image has them; a public or community archive needs none.
    let members: Vec<String> = if live.visibility == "shared" {
        glance
            .members(&live.id)
            .await?
            .into_iter()
            .map(|m| m.member_id)
            .collect()
    } else {
        Vec::new()
    };
    let takes_members = matches!(restore.visibility.as_str(), "shared" | "private");
    let (mut add, mut accept, mut remove, mut share_restore) = (Vec::new(), Vec::new(), Vec::new(), false);
    if !members.is_empty() && takes_members {
        let wanted: BTreeSet<String> = members.into_iter().collect();
        (add, accept) = crate::rotate::members_to_give(glance, &restore, &wanted).await?;
        remove = wanted.into_iter().collect();
        share_restore = restore.visibility == "private";
    } else if !members.is_empty() {
        left_alone.push((
            live.id.clone(),
            format!("members stay: the restored image is {}", restore.visibility),
        ));
    }

    Ok(Planned::Todo(Box::new(Steps {
        name: name.to_string(),
        broken_name: Some(gate::render_name(&opts.broken_name, name, Local::now())),
        live: Some(live),
        broken: None,
        restore,
        share_restore,
        add,
        accept,
        remove,
        left_alone,
    })))
}

/// No image has the name: finish a rollback stopped after step 3, if there is one.
async fn plan_without_live(
    glance: &Glance,
    name: &str,
    left_alone: Vec<(String, String)>,
) -> Result<Planned, RotateError> {
    let mut broken: Vec<Image> = glance
        .list_visible_and_hidden(&[(BROKEN_OF, name)])
        .await?
        .into_iter()
        .filter(|i| i.property(BROKEN_OF) == Some(name) && i.property(ROLLED_BACK_TO).is_some())
        .collect();
    broken.sort_by(|a, b| {
        parse_time(b.property(BROKEN_AT))
            .cmp(&parse_time(a.property(BROKEN_AT)))
            .then_with(|| b.created().cmp(&a.created()))
            .then_with(|| b.id.cmp(&a.id))
    });
    if let Some(b) = broken.into_iter().next() {
        let to = b.property(ROLLED_BACK_TO).unwrap_or_default().to_string();
        match glance.image(&to).await {
            // Still an archive of the name, and not restored from this one
            // (a restored image archived again by a later rotation keeps its tag).
            Ok(x)
                if x.status == "active"
                    && x.owner == b.owner
                    && x.property(ARCHIVE_OF) == Some(name)
                    && x.property(RESTORED_FROM) != Some(b.id.as_str()) =>
            {
                tracing::info!(
                    "A rollback of {name:?} stopped after image {} was renamed {:?}: finishing it with image {}",
                    b.id,
                    b.name(),
                    x.id
                );
                return Ok(Planned::Todo(Box::new(Steps {
                    name: name.to_string(),
                    live: None,
                    broken_name: Some(b.name().to_string()),
                    broken: Some(b),
                    restore: x,
                    share_restore: false,
                    add: Vec::new(),
                    accept: Vec::new(),
                    remove: Vec::new(),
                    left_alone,
                })));
            }
            Ok(_) => {}
            Err(e) if e.status() == Some(404) => {}
            Err(e) => return Err(e),
        }
    }

    Err(RotateError::NothingToRollBack(format!(
        "no active image named {name:?} to roll back, and no rollback of it to finish"
    )))
}

/// The newest active archive; the others that are newer are reported.
fn newest_archive(
    mut archives: Vec<Image>,
    name: &str,
    left_alone: &mut Vec<(String, String)>,
) -> Result<Image, RotateError> {
    archives.sort_by(|a, b| {
        parse_time(b.property(ARCHIVED_AT))
            .cmp(&parse_time(a.property(ARCHIVED_AT)))
            .then_with(|| b.created().cmp(&a.created()))
            .then_with(|| b.id.cmp(&a.id))
    });
    archives.dedup_by(|a, b| a.id == b.id);
    let mut unusable = Vec::new();
    for a in archives {
        if a.status == "active" {
            return Ok(a);
        }
        let why = format!("archive {} {:?} is {}", a.id, a.name(), a.status);
        left_alone.push((a.id.clone(), why.clone()));
        unusable.push(why);
    }
    Err(RotateError::NothingToRollBack(if unusable.is_empty() {
        format!("no archive of {name:?} to roll back to")
    } else {
        format!(
            "no archive of {name:?} to roll back to: only active archives can be restored, and {}",
            unusable.join("; ")
        )
    }))
}

impl Steps {
    fn report(&self, dry_run: bool) -> RollbackReport {
        RollbackReport {
            name: self.name.clone(),
            restored_image_id: self.restore.id.clone(),
            restored_image_old_name: self.restore.name().to_string(),
            broken_image_id: self.live.as_ref().or(self.broken.as_ref()).map(|i| i.id.clone()),
            broken_name: self.broken_name.clone(),
            members_moved: self.remove.clone(),
            shared_restored_image: self.share_restore,
            resumed: self.broken.is_some(),
            already_done: false,
            left_alone: self.left_alone.clone(),
            dry_run,
            http_requests: 0,
        }
    }

    /// Logs what would be done (for `--dry-run`).
    fn log(&self) {
        let (name, x) = (&self.name, &self.restore);
        if self.share_restore {
            tracing::info!("Would make image {} shared to receive members", x.id);
        }
        if let Some(live) = &self.live {
            for m in &self.remove {
                tracing::info!("Would move member {m} from image {} to image {}", live.id, x.id);
            }
            tracing::info!(
                "Would rename image {} from {name:?} to {:?} (private)",
                live.id,
                self.broken_name.as_deref().unwrap_or_default()
            );
        }
        tracing::info!("Would rename image {} from {:?} to {name:?}", x.id, x.name());
        for (id, why) in &self.left_alone {
            tracing::info!("Leaving image {id} alone: {why}");
        }
    }

    async fn execute(&self, glance: &Glance) -> Result<RollbackReport, RotateError> {
        let (name, x) = (&self.name, &self.restore);
        let mut broken_id = self.broken.as_ref().map(|b| b.id.clone());
        if let Some(live) = &self.live {
            // 1. The restored image gets the members first: nobody loses access.
            if self.share_restore {
                glance.make_shared(x).await?;
            }
            for m in &self.add {
                if glance.add_member(&x.id, m).await? {
                    tracing::info!("Added member {m} to image {}", x.id);
                }
            }
            for m in &self.accept {
                glance.set_member_status(&x.id, m, "accepted").await?;
                tracing::info!("Member {m} of image {} accepted", x.id);
            }
            // 2. Then they leave the live image.
            for m in &self.remove {
                glance.remove_member(&live.id, m).await?;
                tracing::info!("Moved member {m} from image {} to image {}", live.id, x.id);
            }
            // 3. The live image is taken off the name, pointing at its replacement first.
            let to = BTreeMap::from([(ROLLED_BACK_TO.to_string(), x.id.clone())]);
            gate::set_properties(glance, &live.id, &to).await?;
            let broken_name = self.broken_name.as_deref().unwrap_or_default();
            gate::mark_broken(glance, &live.id, broken_name, name).await?;
            broken_id = Some(live.id.clone());
        }
        // 4. The archive takes the name, in one request.
        let mut ops = vec![PatchOp::Set {
            path: "/name".into(),
            value: json!(name),
            exists: true,
        }];
        for key in [ARCHIVE_OF, ARCHIVED_AT] {
            if x.extra.contains_key(key) {
                ops.push(PatchOp::Remove {
                    path: format!("/{key}"),
                });
            }
        }
        if x.os_hidden {
            ops.push(PatchOp::Set {
                path: "/os_hidden".into(),
                value: json!(false),
                exists: true,
            });
        }
        if let Some(b) = &broken_id {
            ops.push(PatchOp::Set {
                path: format!("/{RESTORED_FROM}"),
                value: json!(b),
                exists: x.extra.contains_key(RESTORED_FROM),
            });
        }
        glance.patch(&x.id, &ops).await?;
        tracing::info!(
            "Rolled {name:?} back: image {} renamed from {:?} to {name:?}{}",
            x.id,
            x.name(),
            match (&broken_id, &self.broken_name) {
                (Some(b), Some(n)) => format!(" (image {b} is now {n:?})"),
                _ => String::new(),
            }
        );
        for (id, why) in &self.left_alone {
            tracing::info!("Left image {id} alone: {why}");
        }
        Ok(self.report(false))
    }
}
